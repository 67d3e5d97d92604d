"""PLACEHOLDER: being written (a helper owns this module)."""


def adaptive_sharpness(model, data, **kwargs):
    raise NotImplementedError("adaptive_sharpness is being written")


def hessian_max_eigenvalue(model, data, **kwargs):
    raise NotImplementedError("hessian_max_eigenvalue is being written")


def hessian_trace(model, data, **kwargs):
    raise NotImplementedError("hessian_trace is being written")


def quotient_sharpness(model, data, **kwargs):
    raise NotImplementedError("quotient_sharpness is being written")

