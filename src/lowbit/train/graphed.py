"""A training step — forward, backward, optimizer step — captured once as a CUDA graph and then replayed.

At a small batch a QLoRA step is bound by the host, not the GPU: some thousand kernel launches from Python
(an 8-block Llama-3-shaped step at 2,048 tokens: ~100 ms of host time for ~45 ms of GPU work on an H100,
bench/RESULTS.md). A replayed graph launches them all at once. What the replay needs:

- fixed shapes: every batch has the example batch's shapes and dtypes (packed sequences, a fixed batch
  size); its tensors are copied into the step's static inputs;
- an optimizer that can run inside a graph: torch's Adam or AdamW, or lowbit's `AdamW8bit` (switched to
  ``capturable=True`` here), with a constant learning rate (a scheduler's Python-side change never reaches
  the graph);
- gradients where the captured kernels find them: torch's optimizers take them from the graph's pool
  (allocated by the captured backward, written again by each replay); the 8-bit AdamW reads every tensor
  through an address table that must exist before the capture, so for it the gradients are allocated by
  the warm-up and zeroed in place by each replay (they then live for the whole step, not only from the
  backward on: 4 bytes per trainable parameter more at the peak, against the 6 its 8-bit states save);
- no host synchronisation inside the step (no ``.item()``, no branching on tensor values). lowbit's fused
  kernels, chunked loss and 4-bit linears keep everything on the device;
- attention without a materialised mask: under capture transformers will not leave a causal mask to SDPA's
  ``is_causal`` (it refuses while "tracing", a CUDA graph capture included), so it builds a (T × T) mask,
  and with a mask SDPA runs the memory-efficient kernel on K and V repeated to every query head: 0.47 GiB
  more at the 32-block 8B step's peak, a slower kernel. (It builds one because it cannot check, under
  capture, that the positions it made up hold no packed sequences.) For batches without position ids or an
  attention mask, the step warms up and captures with the model's SDPA attention under its own name, whose
  mask function leaves the causal mask to ``is_causal`` (no padding, no cache, no sliding window) and defers
  to transformers' otherwise;
- LoRA dropout draws its seeds on the device while captured (`lora_fused.dropout_seed`), so each replay
  draws new masks;
- an input embedding offloaded to the CPU (`lowbit.train.offload`) looks its rows up outside the graph:
  the step then holds static ``inputs_embeds`` in place of ``input_ids``, filled before each replay. Give
  such a step its token ids on the CPU: ids on the GPU make the host wait for the previous replay to read them.

Capturing needs eager warm-up steps first (kernel autotuning, cuBLAS workspaces, the optimizer's state).
Their effect is undone — the trainable parameters are restored and the optimizer state zeroed, which for
Adam is its fresh state — so the first call is the first real step. On the CPU the same object runs the
step eagerly (and still warms up and undoes it), so the bookkeeping is tested where CI runs.
"""

from __future__ import annotations

import contextlib
from typing import Callable

import torch
from torch import nn

from lowbit.optim import AdamW8bit
from lowbit.train.offload import embeddings_offloaded

GRAPH_OPTIMIZERS = (torch.optim.Adam, torch.optim.AdamW, AdamW8bit)
CAUSAL_SDPA = "lowbit_causal_sdpa"  # transformers' SDPA attention, with the mask function below


def causal_sdpa_mask(**kwargs):
    """transformers' `sdpa_mask`, except that without a padding mask, a KV cache or a sliding window the mask is None
    (left to SDPA's ``is_causal``), also while a CUDA graph is being captured. Only for batches without position
    ids: transformers composes a packed-sequence mask from them that it cannot check under capture."""
    from transformers.masking_utils import sdpa_mask

    # transformers passes keywords; before 5.0 the query length came as cache_position
    q_length = kwargs["q_length"] if "q_length" in kwargs else kwargs["cache_position"].shape[0]
    if kwargs.get("attention_mask") is None and kwargs.get("local_size") is None and q_length == kwargs["kv_length"]:
        return None
    return sdpa_mask(**kwargs)


@contextlib.contextmanager
def causal_sdpa(model: nn.Module):
    """While active, a model on transformers' SDPA attention runs it as `CAUSAL_SDPA` (see the module docstring):
    for batches of whole, unpacked sequences only (no position ids, no attention mask)."""
    config = getattr(model, "config", None)
    if getattr(config, "_attn_implementation", None) != "sdpa":
        yield
        return
    from transformers.integrations.sdpa_attention import sdpa_attention_forward
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    ALL_ATTENTION_FUNCTIONS.register(CAUSAL_SDPA, sdpa_attention_forward)
    ALL_MASK_ATTENTION_FUNCTIONS.register(CAUSAL_SDPA, causal_sdpa_mask)
    config._attn_implementation = CAUSAL_SDPA
    try:
        yield
    finally:
        config._attn_implementation = "sdpa"


def model_loss(model: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    return model(**batch).loss


def step_inputs(embedding: nn.Module | None, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """What a captured step reads: the batch, with an offloaded embedding's rows in place of the token ids (the
    lookup runs on the CPU, outside the graph)."""
    if embedding is None or "input_ids" not in batch:
        return batch
    with torch.no_grad():
        rows = embedding(batch["input_ids"])  # looked up on the CPU, copied to the model's device
    return {("inputs_embeds" if k == "input_ids" else k): (rows if k == "input_ids" else v)
            for k, v in batch.items()}  # fmt: skip


class GraphedStep:
    """``step(batch) -> loss``: one optimizer step of ``model`` on ``batch``, replayed as a CUDA graph on a GPU.

    ``example`` fixes the batch's keys, shapes and dtypes; ``loss_fn(model, batch)`` (default: the output's
    ``.loss``, so the batch carries labels). The returned loss is the step's static output tensor: read or
    clone it before the next call.
    """

    def __init__(self, model: nn.Module, optimizer: torch.optim.Optimizer, example: dict[str, torch.Tensor],
                 loss_fn: Callable[[nn.Module, dict], torch.Tensor] = model_loss, warmup: int = 2) -> None:  # fmt: skip
        if type(optimizer) not in GRAPH_OPTIMIZERS:
            raise TypeError(f"a graphed step takes torch's Adam or AdamW or lowbit's AdamW8bit (whose zeroed state "
                            f"is a fresh one), got {type(optimizer).__name__}")  # fmt: skip
        if any(group.get("paged") for group in optimizer.param_groups):
            raise ValueError("a paged optimizer moves its states between steps, which a captured step cannot")
        if not example or not all(torch.is_tensor(v) for v in example.values()):
            raise ValueError("example must be a non-empty dict of tensors (input_ids, labels, …)")
        self.model, self.optimizer, self.loss_fn = model, optimizer, loss_fn
        self.keep_gradients = type(optimizer) not in (torch.optim.Adam, torch.optim.AdamW)  # see the docstring
        self.keys = example.keys()
        self.embedding = model.get_input_embeddings() if embeddings_offloaded(model) else None
        # Detached: a static input that required grad would send its gradient, inside the capture, to a tensor
        # made outside it (on another stream), which invalidates the capture.
        self.static = {k: v.detach().clone() for k, v in step_inputs(self.embedding, example).items()}
        self.cuda = any(v.device.type == "cuda" for v in self.static.values())
        if self.cuda:
            for group in optimizer.param_groups:
                group["capturable"] = True
        unpacked = not {"attention_mask", "position_ids"} & example.keys()
        with causal_sdpa(model) if unpacked else contextlib.nullcontext():
            self._warm_up_and_capture(warmup)

    def _warm_up_and_capture(self, warmup: int) -> None:
        optimizer = self.optimizer
        params = [p for group in optimizer.param_groups for p in group["params"]]
        start = [p.detach().clone() for p in params]
        stream = torch.cuda.Stream() if self.cuda else None
        if stream is not None:
            stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream) if stream is not None else contextlib.nullcontext():
            for _ in range(warmup):
                self._eager_step()
        if stream is not None:
            torch.cuda.current_stream().wait_stream(stream)
        with torch.no_grad():  # undo the warm-up: the first call is the first real step
            for p, value in zip(params, start):
                p.copy_(value)
            for state in optimizer.state.values():
                for key, value in state.items():
                    if torch.is_tensor(value):
                        value.zero_()
                    elif key == "step":  # AdamW8bit's host counter (off the GPU)
                        state[key] = 0
        del start  # not through the capture: it would add the trainable parameters' size to the step's peak
        self.graph: torch.cuda.CUDAGraph | None = None
        self.loss: torch.Tensor | None = None
        if self.cuda:
            optimizer.zero_grad(set_to_none=not self.keep_gradients)
            self.graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(self.graph):
                self.loss = self._step()

    def _step(self) -> torch.Tensor:
        if self.keep_gradients:
            self.optimizer.zero_grad(set_to_none=False)
        loss = self.loss_fn(self.model, self.static)
        loss.backward()
        self.optimizer.step()
        return loss.detach()

    def _eager_step(self) -> torch.Tensor:
        self.optimizer.zero_grad(set_to_none=not self.keep_gradients)
        return self._step()

    def __call__(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        if batch.keys() != self.keys:
            raise ValueError(f"the batch has keys {sorted(batch)}, the captured step {sorted(self.keys)}")
        for key, value in step_inputs(self.embedding, batch).items():
            held = self.static[key]
            if value.shape != held.shape or value.dtype != held.dtype:
                raise ValueError(f"{key}: the captured step takes {tuple(held.shape)} {held.dtype}, got "
                                 f"{tuple(value.shape)} {value.dtype} (pad or pack batches to one shape)")  # fmt: skip
            held.copy_(value)
        if self.graph is None:
            return self._eager_step()
        self.graph.replay()
        return self.loss


class GraphedBackward:
    """``graphed(batch, scale) -> loss``: ``(loss · scale).backward()`` of one micro-batch, replayed as a CUDA graph.

    For a trainer that keeps its optimizer step, gradient clipping and finiteness checks eager — the step's host
    synchronisation then costs the gap of one graph launch — while the forward and backward, thousands of
    kernel launches, run as one graph. ``loss_fn(model, batch)`` returns the micro-batch's loss (a sum, say);
    ``scale`` multiplies it before backward (1 / the global batch's token count). The returned loss is a static
    output: read it before the next call.

    - One graph per batch signature (keys, shapes, dtypes), all in one memory pool: pad batches to a few
      widths. A new signature is warmed up (forward and `torch.autograd.grad`, which leaves ``.grad`` alone)
      and captured, on the first batch that has it.
    - Gradients accumulate in place into ``.grad`` tensors that must exist before the first call and must
      never be replaced: zero them with ``zero_grad(set_to_none=False)``.
    - Batches without an attention mask or position ids run their attention through `causal_sdpa`.
    - ``autocast``: a factory of the autocast context to run the forward in (``cache_enabled=False``).
    - On the CPU it runs eagerly, so CI tests its bookkeeping.
    """

    def __init__(self, model: nn.Module, loss_fn: Callable[[nn.Module, dict], torch.Tensor],
                 autocast: Callable[[], contextlib.AbstractContextManager] = contextlib.nullcontext,
                 warmup: int = 1) -> None:  # fmt: skip
        self.model, self.loss_fn, self.autocast, self.warmup = model, loss_fn, autocast, warmup
        inner = getattr(model, "module", model)
        self.embedding = inner.get_input_embeddings() if embeddings_offloaded(inner) else None
        self.params = [p for p in model.parameters() if p.requires_grad]
        self.graphs: dict[tuple, tuple] = {}  # signature → (graph, static inputs, static scale, static loss)
        self.pool = None

    def __call__(self, batch: dict[str, torch.Tensor], scale: float) -> torch.Tensor:
        inputs = step_inputs(self.embedding, batch)
        if not any(v.is_cuda for v in inputs.values()):
            with self.autocast():
                loss = self.loss_fn(self.model, inputs)
            (loss * scale).backward()
            return loss.detach()
        if any(p.grad is None for p in self.params):
            raise RuntimeError("a graphed backward accumulates into existing .grad tensors: allocate them before the "
                               "first call and zero them with zero_grad(set_to_none=False)")  # fmt: skip
        signature = tuple((k, tuple(v.shape), v.dtype) for k, v in inputs.items())
        graph, static, static_scale, loss = self.graphs.get(signature) or self._capture(signature, inputs)
        for key, value in inputs.items():
            static[key].copy_(value)
        static_scale.fill_(scale)
        graph.replay()
        return loss

    def _capture(self, signature: tuple, inputs: dict[str, torch.Tensor]) -> tuple:
        static = {k: v.detach().clone() for k, v in inputs.items()}  # detached: see GraphedStep
        scale = torch.ones((), dtype=torch.float32, device=next(iter(static.values())).device)
        unpacked = not {"attention_mask", "position_ids"} & static.keys()
        with causal_sdpa(self.model) if unpacked else contextlib.nullcontext():
            stream = torch.cuda.Stream()
            stream.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(stream):
                for _ in range(self.warmup):  # autotuning, cuBLAS workspaces, the allocator: outside the capture
                    with self.autocast():
                        warm = self.loss_fn(self.model, static) * scale
                    torch.autograd.grad(warm, self.params, allow_unused=True)
                    del warm
            torch.cuda.current_stream().wait_stream(stream)
            graph = torch.cuda.CUDAGraph()
            try:
                with torch.cuda.graph(graph, pool=self.pool):
                    with self.autocast():
                        loss = self.loss_fn(self.model, static)
                    (loss * scale).backward()
            except RuntimeError as e:  # an op that synchronises with the host, or one CUDA graphs do not support
                raise RuntimeError(f"this model's forward and backward cannot be captured as a CUDA graph ({e}); "
                                   "train without cuda_graphs") from e  # fmt: skip
        self.pool = self.pool or graph.pool()
        self.graphs[signature] = entry = (graph, static, scale, loss.detach())
        return entry
