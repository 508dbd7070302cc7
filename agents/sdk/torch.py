"""PyTorch hooks for :class:`~.training.TrainingMonitor` (extra ``torch``, imported lazily).

:func:`watch` registers

* a post-accumulate-grad hook on every trainable parameter, keeping each one's
  latest squared gradient norm; at the next ``monitor.step()`` the global norm
  ``sqrt(sum ||g||^2)`` becomes ``grad_norm`` unless the caller passed one
  (gradient accumulation is fine: the norm is of the final, accumulated grads);
* a forward hook on the named ``layer`` that records the mean, standard
  deviation, largest absolute value and fraction of exact zeros of its output
  as ``stethoscope.train.activation.{mean,std,abs_max,zero_fraction}`` with
  attribute ``stethoscope.train.layer``, every ``every``-th forward pass.

Each statistic costs one device sync per step (the four activation statistics
are read back together). :meth:`Watch.remove` takes every hook off again.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

from stethoscope._extras import require

from .training import TrainingMonitor

__all__ = ["Watch", "watch", "ACTIVATION_STATS"]

ACTIVATION_STATS = ("mean", "std", "abs_max", "zero_fraction")


@dataclass
class Watch:
    """The hooks :func:`watch` installed; :meth:`remove` uninstalls them."""

    handles: list[Any] = field(default_factory=list)
    removers: list[Any] = field(default_factory=list)

    def remove(self) -> None:
        for h in self.handles:
            h.remove()
        for r in self.removers:
            r()
        self.handles.clear()
        self.removers.clear()


def watch(model: Any, monitor: TrainingMonitor, layer: str | None = None, *, grad_norm: bool = True,
          every: int = 1) -> Watch:
    """Hook ``model`` (a ``torch.nn.Module``) up to ``monitor``; see the module docstring.

    Raises :class:`~stethoscope.errors.MissingExtraError` without torch,
    ``AttributeError`` for a ``layer`` the model does not have, and
    ``ValueError`` for ``every < 1``: all at set-up time, never in a hook.
    """
    torch = require("torch", extra="torch", feature="stethoscope.agents.sdk.torch.watch")
    if not isinstance(model, torch.nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    if not isinstance(every, int) or every < 1:
        raise ValueError(f"every must be a positive integer, got {every!r}")
    target = model.get_submodule(layer) if layer else None
    handle = Watch()

    if grad_norm:
        latest: dict[int, Any] = {}

        def on_grad(param: Any) -> None:
            if param.grad is not None:
                latest[id(param)] = param.grad.detach().float().pow(2).sum()

        for param in model.parameters():
            if param.requires_grad:
                handle.handles.append(param.register_post_accumulate_grad_hook(on_grad))

        def at_step() -> dict[str, float] | None:
            if not latest:
                return None
            total = torch.stack(list(latest.values())).sum()
            latest.clear()
            return {"grad_norm": math.sqrt(float(total))}

        handle.removers.append(monitor.add_step_hook(at_step))

    if target is not None:
        seen = [0]
        attrs = {"stethoscope.train.layer": layer}

        def on_forward(module: Any, inputs: Any, output: Any) -> None:
            seen[0] += 1
            if (seen[0] - 1) % every:
                return
            out = output[0] if isinstance(output, (tuple, list)) else output
            if not torch.is_tensor(out) or out.numel() == 0:
                return
            with torch.no_grad():
                x = out.detach().float()
                std = x.std() if x.numel() > 1 else torch.zeros((), device=x.device)
                stats = torch.stack([x.mean(), std, x.abs().max(), (x == 0).float().mean()]).tolist()
            for name, value in zip(ACTIVATION_STATS, stats):
                monitor.observe(f"activation.{name}", value, **attrs)

        handle.handles.append(target.register_forward_hook(on_forward))
    return handle
