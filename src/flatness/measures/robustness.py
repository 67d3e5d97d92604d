"""PLACEHOLDER: being written (a helper owns this module)."""


def feature_robustness(model, data, **kwargs):
    raise NotImplementedError("feature_robustness is being written")

