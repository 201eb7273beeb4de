"""How many pixels a model may process per image: measured from the model, sized to the device.

A 117 KB PNG can declare 40 megapixels; a U-Net that keeps its input size then needs
gigabytes and tens of seconds. The default limit divides a share of the device's memory
by the activation bytes one processed pixel costs, measured once at load time by summing
every layer's output on a small input (an upper bound: inference frees most of them).
"""

from __future__ import annotations

import os

import torch
from torch import nn

DEVICE_SHARE = {"cuda": 0.4, "cpu": 0.25}
"""Share of device memory one image's forward may use (a reload holds two models at once)."""
MIN_PIXELS = 64 * 64


def _graph_bytes(graph: torch.fx.GraphModule, example: tuple[torch.Tensor, ...]) -> int:
    """The same sum for a graph of operators (a torch.export program has no layers to hook): every
    node's output, run node by node."""
    total = 0

    class Counting(torch.fx.Interpreter):
        def run_node(self, n: torch.fx.Node) -> object:
            nonlocal total
            out = super().run_node(n)
            if n.op == "call_function":
                outputs = out if isinstance(out, (tuple, list)) else (out,)
                total += sum(t.numel() * t.element_size() for t in outputs if isinstance(t, torch.Tensor))
            return out

    with torch.inference_mode():
        Counting(graph).run(*example)
    return total


def activation_bytes_per_pixel(model: nn.Module, example: tuple[torch.Tensor, ...]) -> float:
    """Bytes of layer outputs per input pixel for one forward of ``example`` (batch of one)."""
    height, width = example[0].shape[-2:]
    graphs = [m for m in model.modules() if isinstance(m, torch.fx.GraphModule)]
    if graphs:
        return max(_graph_bytes(graphs[0], example), 1) / float(height * width)
    total = 0

    def count(_module: nn.Module, _inputs: object, output: object) -> None:
        nonlocal total
        outputs = output if isinstance(output, (tuple, list)) else (output,)
        total += sum(t.numel() * t.element_size() for t in outputs if isinstance(t, torch.Tensor))

    leaves = [m for m in model.modules() if not list(m.children())]
    handles = [m.register_forward_hook(count) for m in leaves]
    try:
        with torch.inference_mode():
            model(*example)
    finally:
        for handle in handles:
            handle.remove()
    return max(total, 1) / float(height * width)


def device_memory_bytes(device: torch.device) -> int:
    if device.type == "cuda":
        return int(torch.cuda.get_device_properties(device).total_memory)
    return int(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"))


def default_pixel_limit(bytes_per_pixel: float, device: torch.device, ceiling: int) -> int:
    budget = device_memory_bytes(device) * DEVICE_SHARE.get(device.type, 0.25)
    return int(min(max(budget / bytes_per_pixel, MIN_PIXELS), ceiling))
