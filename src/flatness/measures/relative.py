"""PLACEHOLDER: being written (a helper owns this module)."""


def relative_flatness(model, data, **kwargs):
    raise NotImplementedError("relative_flatness is being written")


def relative_flatness_col(model, data, **kwargs):
    raise NotImplementedError("relative_flatness_col is being written")


def relative_flatness_max(model, data, **kwargs):
    raise NotImplementedError("relative_flatness_max is being written")


def rho_sigma(model, data, **kwargs):
    raise NotImplementedError("rho_sigma is being written")

