"""Expected GPU time of a study's training stage: an estimate from counted FLOPs, not a measurement.

``python -m flatness estimate --configfile config/paper/X.yaml`` prints one row per run and the
study's total. Per run (:func:`estimate_run`):

* **forward FLOPs per sample** F, counted by ``torch.utils.flop_counter.FlopCounterMode`` on one
  input of the dataset's shape (:func:`forward_flops`). It counts matmuls and convolutions (a
  matmul as 2·m·n·k); elementwise work (ReLU, BatchNorm, pooling, the optimizer update) is not
  counted: few FLOPs, and it is memory-bound rather than FLOP-bound;
* **training** 3·F per sample per gradient pass (forward + a backward of ≈ 2 forwards; counting a
  real step with FlopCounterMode gives 2.4–3.0·F for the MLP, LeNet5 and ResNet-18 here, since the
  first layer needs no input gradient, so 3 is an upper bound), × the training-set size × the
  epoch cap × the regulariser's gradient passes per step (:data:`GRADIENT_PASSES`);
* **evaluation** one forward over the full training set and the test set per epoch (the trainer
  logs both every epoch).

The epoch cap makes the work an **upper bound**: a run that reaches ``target_train_loss`` or
plateaus stops earlier (the time is one too only as far as the two rates below hold). Two stated assumptions, not measurements, turn FLOPs into time:
:data:`SUSTAINED_FLOPS` (sustained float32 throughput) and :data:`PASS_OVERHEAD_S` (the fixed cost of
one forward + backward pass in eager PyTorch: kernel launches, Python, the trainer's per-step
``float(loss)`` host sync), a floor that dominates for the small nets, where a pass is far below a
millisecond of arithmetic. A pass takes ``max(FLOPs / SUSTAINED_FLOPS, PASS_OVERHEAD_S)``; an
evaluation batch ``max(FLOPs / SUSTAINED_FLOPS, PASS_OVERHEAD_S / 3)`` (a forward only).

Not included: the measure stage (its Lanczos, Hutchinson, L-BFGS-B and bisection loops stop on
tolerances, so their HVP counts are not known before the run: in benchmarks/RESULTS.md one HVP
costs 1.6–2.1 gradients and λ_max took 9–10 Lanczos HVPs, and the Hutchinson trace may use up to
``max_probes`` = 200 HVPs), the interpolation stage (forwards only), data loading and job start-up.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

#: Assumed sustained float32 throughput of one GPU, FLOP/s (an assumption, not a measurement:
#: a data-centre GPU such as an A100/H100 sustains tens of TFLOP/s on convolution- and matmul-
#: heavy float32 training with TF32 tensor cores; plain FP32 CUDA cores peak at 19.5 (A100) to
#: ≈ 67 (H100/H200) TFLOP/s).
SUSTAINED_FLOPS = 25e12
#: Assumed fixed cost of one training forward + backward pass, seconds (an assumption: tens to a
#: few hundred kernel launches at ≈ 5–10 µs each plus the per-step host sync).
PASS_OVERHEAD_S = 1e-3
#: Forward + backward FLOPs of one gradient pass per forward FLOP (an upper bound, see above).
BACKWARD_FACTOR = 3
#: regularizer.name → forward + backward passes per optimizer step (flatness.regularizers):
#: SAM/ASAM take the gradient at w and again at w + ε; FAM is one pass (its penalty is a closed
#: form on the last layer's features and logits from the same forward: O(N·d² + d²·m) extra; a
#: counted step of the MLP, LeNet5 and ResNet-18 here is 1.000–1.005× a plain one); the Lipschitz penalty is double backpropagation (an
#: input gradient with create_graph, then a backward through it: ≈ 2 passes, approximate).
GRADIENT_PASSES = {
    "none": 1,
    "weight_decay": 1,
    "sam": 2,
    "asam": 2,
    "fam": 1,
    "lipschitz": 2,
}


def forward_flops(model_cfg: Mapping[str, Any]) -> int:
    """FLOPs of one forward pass on one sample of ``model_cfg`` (``flatness.models.build_model``'s
    dict, with ``in_shape`` and ``num_classes``), counted by ``FlopCounterMode`` in eval mode.
    The caller's global RNG state is left as it was.

    >>> forward_flops({"name": "mlp", "widths": [8], "in_shape": [1, 2, 2], "num_classes": 3})
    112
    """
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    from flatness.models import build_model

    with torch.random.fork_rng(devices=[]):
        model = build_model(dict(model_cfg)).eval()
    x = torch.zeros(1, *(int(s) for s in model_cfg["in_shape"]))
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        model(x)
    return int(counter.get_total_flops())


@dataclass(frozen=True)
class RunEstimate:
    """One run's training-stage estimate at its epoch cap (see the module docstring)."""

    run_id: str
    forward_flops: int  # per sample
    passes: int  # gradient passes per optimizer step
    epochs: int  # the cap
    n_train: int
    n_test: int
    steps: int  # optimizer steps over all epochs
    train_flops: float
    eval_flops: float
    seconds: float  # GPU seconds at the assumed throughput and pass overhead

    @property
    def flops(self) -> float:
        return self.train_flops + self.eval_flops

    @property
    def gpu_hours(self) -> float:
        return self.seconds / 3600.0


def _batched_seconds(n: int, batch: int, flops_per_sample: float, throughput, floor) -> float:
    """Time of one sweep over ``n`` samples in batches of ``batch`` (the last one smaller)."""
    full, rest = divmod(n, batch)
    t = full * max(flops_per_sample * batch / throughput, floor)
    return t + (max(flops_per_sample * rest / throughput, floor) if rest else 0.0)


def estimate_run(
    config: Mapping[str, Any],
    run_id: str = "",
    throughput: float = SUSTAINED_FLOPS,
    pass_overhead_s: float = PASS_OVERHEAD_S,
    _cache: dict | None = None,
) -> RunEstimate:
    """The estimate of one resolved run config (a :class:`flatness.config.RunConfig` dict, as
    :func:`flatness.suite.expand_grid` gives it)."""
    from flatness.config import RunConfig
    from flatness.data import dataset_sizes

    cfg = RunConfig.from_dict(dict(config))
    n_train, n_test, shape, classes = dataset_sizes(cfg.data)
    model_cfg = {**cfg.to_dict()["model"], "in_shape": list(shape), "num_classes": classes}
    key = json.dumps(model_cfg, sort_keys=True)
    cache = {} if _cache is None else _cache
    if key not in cache:
        cache[key] = forward_flops(model_cfg)
    fwd = cache[key]
    if cfg.regularizer.name not in GRADIENT_PASSES:
        raise ValueError(f"regularizer.name = {cfg.regularizer.name!r} has no pass count")
    passes = GRADIENT_PASSES[cfg.regularizer.name]
    epochs = cfg.epochs
    per_pass = BACKWARD_FACTOR * fwd
    train_flops = float(per_pass) * n_train * passes * epochs
    eval_flops = float(fwd) * (n_train + n_test) * epochs
    train_s = passes * _batched_seconds(n_train, cfg.batch_size, per_pass, throughput,
                                        pass_overhead_s)  # fmt: skip
    eval_s = sum(
        _batched_seconds(n, cfg.eval_batch_size, fwd, throughput, pass_overhead_s / 3)
        for n in (n_train, n_test)
    )
    return RunEstimate(
        run_id=run_id,
        forward_flops=fwd,
        passes=passes,
        epochs=epochs,
        n_train=n_train,
        n_test=n_test,
        steps=math.ceil(n_train / cfg.batch_size) * epochs,
        train_flops=train_flops,
        eval_flops=eval_flops,
        seconds=(train_s + eval_s) * epochs,
    )


def estimate_study(
    config: Mapping[str, Any],
    throughput: float = SUSTAINED_FLOPS,
    pass_overhead_s: float = PASS_OVERHEAD_S,
) -> list[RunEstimate]:
    """:func:`estimate_run` for every run of the study config (the dict the workflow validates),
    the forward FLOPs counted once per distinct model and input shape."""
    from flatness.suite import expand_grid

    cache: dict = {}
    return [
        estimate_run(r.config, r.run_id, throughput, pass_overhead_s, _cache=cache)
        for r in expand_grid(config)
    ]


def format_estimate(
    estimates: Sequence[RunEstimate],
    title: str,
    throughput: float = SUSTAINED_FLOPS,
    pass_overhead_s: float = PASS_OVERHEAD_S,
) -> str:
    """The study total (first line) and the per-run table, as plain text."""
    hours = sum(e.gpu_hours for e in estimates)
    flops = sum(e.flops for e in estimates)
    flop_hours = flops / throughput / 3600.0
    lines = [
        f"{title}: ≈ {hours:.3g} GPU-hours for {len(estimates)} runs (upper bound: every run "
        f"trains to its epoch cap)",
        f"  {flops / 1e15:.4g} PFLOP of training + per-epoch train/test evaluation = "
        f"{flop_hours:.3g} h at {throughput / 1e12:g} TFLOP/s sustained float32; {hours:.3g} h "
        f"with a floor of {pass_overhead_s * 1e3:g} ms per forward+backward pass (both rates "
        "are assumptions, not measurements)",
        "  not included: the measure and interpolation stages, data loading, job start-up",
        "",
    ]
    header = ("run", "fwd MFLOP/sample", "passes", "epochs (cap)", "steps", "PFLOP", "GPU-h")
    rows = [
        (
            e.run_id,
            f"{e.forward_flops / 1e6:.3f}",
            str(e.passes),
            str(e.epochs),
            f"{e.steps:,}",
            f"{e.flops / 1e15:.3f}",
            f"{e.gpu_hours:.3g}",
        )
        for e in estimates
    ]
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]

    def fmt(row) -> str:
        cells = [row[0].ljust(widths[0])] + [
            c.rjust(w) for c, w in zip(row[1:], widths[1:], strict=True)
        ]
        return "  ".join(cells).rstrip()

    lines += [fmt(header), fmt(tuple("-" * w for w in widths)), *map(fmt, rows)]
    return "\n".join(lines)
