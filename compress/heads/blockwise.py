"""Head scores of a model too big for the device: every probe runs block by block (``compress.io.blocks``), and
what a scorer needs from block i is taken while only block i is loaded.

``BlockCapture(path)`` answers the same questions as the whole-model capture of ``capture.py``, for all probes at
once (one pass over the blocks, not one per probe):

- ``head_output_pairs``: the output projection's input at the last position, with and without the span (vhd, chd);
- ``sink_ratios``: each layer's attention (eager, from the attention module the model itself records
  ``attentions`` from), reduced to the sink ratio before the next layer runs (sink);
- ``last_attention_and_lens``: the predicting position's attention row and the logit lens of the span positions
  (the block's input through the final norm and the LM head) (nhar);
- ``seekr``: forgettability with the base model run in lockstep (block i of each loaded), then the answer loss
  at the head and its gradient carried back block by block, each block run again on its stored input to give
  ∂L/∂attention (sensitivity).

Only block i's attention maps exist at a time ([H, T, T] per probe), never the [L, H, T, T] stack. Text probes
only: a LLaVA's image probes need the vision tower in the forward (score those with the whole model).
"""

from __future__ import annotations

import contextlib
from typing import Callable, Sequence

import torch

from compress.errors import CompressError
from compress.heads import methods as S
from compress.heads.capture import Probe
from compress.heads.layout import attention_layout


def _attention_source(model) -> tuple[type, int, str]:
    """(module class, output index, name suffix) the model records its ``attentions`` from."""
    for m in model.modules():
        spec = (getattr(type(m), "_can_record_outputs", None) or {}).get("attentions")
        if spec is not None:
            if isinstance(spec, type):
                return spec, 1, ""
            return spec.target_class, spec.index, (spec.layer_name or "").lstrip(".")
    raise CompressError(f"{type(model).__name__}: does not say which module returns its attention maps")


class BlockCapture:
    """One model folder, its probes run block by block (see the module docstring)."""

    def __init__(self, path, *, device: str | torch.device = "cpu", quiet: bool | None = None):
        from compress.io.blocks import BlockRunner

        self.path, self.quiet = path, quiet
        self.runner = BlockRunner(path, device=device, dtype=torch.float32)
        self.layout = attention_layout(self.runner.model)
        if self.layout.n_layers != self.runner.n_blocks:
            raise CompressError(f"{path}: {self.layout.n_layers} attention layers but {self.runner.n_blocks} blocks")
        self._attn_cls, self._attn_index, self._attn_name = _attention_source(self.runner.model)

    @property
    def config(self):
        return self.runner.model.config

    def close(self) -> None:
        self.runner.close()

    def __enter__(self) -> "BlockCapture":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # -- one pass ----------------------------------------------------------------------------------------------
    def _eager(self) -> None:
        model = self.runner.model
        if getattr(model.config, "_attn_implementation", None) != "eager":
            model.set_attn_implementation("eager")

    def _start(self, probes: Sequence[Probe], ids: Callable[[Probe], torch.Tensor] = lambda p: p.input_ids):
        if any(p.pixel_values is not None for p in probes):
            raise CompressError(f"{self.path}: block-wise head scoring takes text probes; probes with an image need "
                                "the vision tower (score them with the whole model)")
        return self.runner.start([ids(p).reshape(1, -1) for p in probes])

    def _attention_modules(self, block) -> list[torch.nn.Module]:
        return [m for n, m in block.named_modules() if isinstance(m, self._attn_cls)
                and (not self._attn_name or n == self._attn_name or n.endswith("." + self._attn_name))]

    @contextlib.contextmanager
    def _hooks(self, i: int, block, on_attention=None, on_o_input=None):
        """While active, block ``i``'s attention maps ([B, H, T, T]) go to ``on_attention(b, attn)`` and its
        output projection's input at the last position ([H, d]) to ``on_o_input(b, x)``, ``b`` the batch."""
        state = {"b": -1}
        handles = [block.register_forward_pre_hook(lambda *_: state.__setitem__("b", state["b"] + 1))]
        if on_attention is not None:
            def attn_hook(_m, _args, out):
                on_attention(state["b"], out[self._attn_index])
            handles += [m.register_forward_hook(attn_hook) for m in self._attention_modules(block)]
        if on_o_input is not None:
            lay = self.layout
            o = self.runner.model.get_submodule(lay.layers[i].o)
            handles.append(o.register_forward_pre_hook(lambda _m, args: on_o_input(
                state["b"], args[0][0, -1].detach().float().reshape(lay.n_heads, lay.head_dim))))
        try:
            yield
        finally:
            for h in handles:
                h.remove()

    def _blocks(self, what: str):
        from compress.progress import track

        runner = self.runner
        for i in track(range(runner.n_blocks), f"heads {what} (block by block)", quiet=self.quiet):
            block = runner.load_block(i)
            try:
                yield i, block
            finally:
                runner.free_block(i)

    # -- what the scorers need ---------------------------------------------------------------------------------
    @torch.no_grad()
    def head_output_pairs(self, probes: Sequence[Probe]) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Per probe ([L, H, d] with the span, [L, H, d] without it) at the predicting position."""
        if any(p.without_ids is None for p in probes):
            raise CompressError("a divergence score needs each probe with and without its context/image")
        both = [q for p in probes for q in (p, Probe(p.without_ids))]
        acts = self._start(both)
        got = [[None] * self.runner.n_blocks for _ in both]
        for i, block in self._blocks("outputs"):
            with self._hooks(i, block, on_o_input=lambda b, x: got[b].__setitem__(i, x.cpu())):
                self.runner.run(i, block, acts)
        stacks = [torch.stack(g) for g in got]
        return [(stacks[2 * k], stacks[2 * k + 1]) for k in range(len(probes))]

    @torch.no_grad()
    def sink_ratios(self, probes: Sequence[Probe]) -> list[torch.Tensor]:
        """Per probe the [L, H] mean attention on the first token (``methods.sink_ratio``, layer by layer)."""
        self._eager()
        acts = self._start(probes)
        got = [[None] * self.runner.n_blocks for _ in probes]
        for i, block in self._blocks("sink"):
            def keep(b, attn):
                got[b][i] = S.sink_ratio(attn[:1].float())[0].cpu()
            with self._hooks(i, block, on_attention=keep):
                self.runner.run(i, block, acts)
        return [torch.stack(g) for g in got]

    @torch.no_grad()
    def last_attention_and_lens(self, probes: Sequence[Probe]) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Per probe ([L, H, T] attention of the predicting position, [L, n] logit-lens top-1 of the span
        positions: each block's input through the final norm and the LM head)."""
        if self.runner.model.get_output_embeddings() is None:
            raise CompressError(f"{self.path}: no output embedding for the logit lens (nhar needs an LM head)")
        self._eager()
        acts = self._start(probes)
        pos = [torch.nonzero(p.span).reshape(-1) for p in probes]
        attn = [[None] * self.runner.n_blocks for _ in probes]
        lens = [[None] * self.runner.n_blocks for _ in probes]
        for i, block in self._blocks("nhar"):
            for b, h in enumerate(acts.hidden):
                lens[b][i] = self.runner.head(h[0, pos[b].to(h.device)]).argmax(-1).cpu()

            def keep(b, a):
                attn[b][i] = a[0, :, -1, :].float().cpu()
            with self._hooks(i, block, on_attention=keep):
                self.runner.run(i, block, acts)
        return [(torch.stack(a), torch.stack(n)) for a, n in zip(attn, lens)]

    def seekr(self, probes: Sequence[Probe], base: "BlockCapture") -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """Per probe ([L, H] Σ (∂L/∂A)², [L, H] ‖A − A_base‖_F): SEEKR's sensitivity and forgettability."""
        if any(p.labels is None for p in probes):
            raise CompressError("seekr needs probes with an 'answer' (the loss is taken on it)")
        runner, n = self.runner, self.runner.n_blocks
        if base.runner.n_blocks != n:
            raise CompressError(f"{base.path} has {base.runner.n_blocks} blocks, {self.path} {n}")
        self._eager()
        base._eager()
        acts, base_acts = self._start(probes), base._start(probes)
        inputs: list[list[torch.Tensor]] = []
        forg = [[None] * n for _ in probes]
        with torch.no_grad():
            for i, block in self._blocks("seekr forward"):
                inputs.append([h.cpu() for h in acts.hidden])  # every block's input, for the backward pass: host
                bblock = base.runner.load_block(i)
                mine, theirs = {}, {}
                with self._hooks(i, block, on_attention=lambda b, a: mine.__setitem__(b, a[:1].float())):
                    runner.run(i, block, acts)
                with base._hooks(i, bblock, on_attention=lambda b, a: theirs.__setitem__(b, a[:1].float())):
                    base.runner.run(i, bblock, base_acts)
                    base.runner.free_block(i)
                for b in range(len(probes)):
                    forg[b][i] = S.attention_change(mine[b], theirs[b])[0].cpu()
        grads = [self._loss_grad(h, p.labels) for h, p in zip(acts.hidden, probes)]
        sens = [[None] * n for _ in probes]
        for i in reversed(range(n)):
            block = runner.load_block(i)
            try:
                for b in range(len(probes)):
                    grads[b], sens[b][i] = self._block_backward(i, block, inputs[i][b], acts.calls[b][i], grads[b])
            finally:
                runner.free_block(i)
        return [torch.stack(s) for s in sens], [torch.stack(f) for f in forg]

    def _loss_grad(self, hidden: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """∂(the model's own causal-LM loss on ``labels``)/∂(the last block's output)."""
        from compress.heads.capture import _final_norm_and_head

        runner = self.runner
        runner.head(hidden[:, :1])  # loads the final norm and the head
        norm, head = _final_norm_and_head(runner.model)
        with torch.enable_grad():
            h = hidden.detach().to(runner.device).requires_grad_(True)
            logits = head(norm(h) if norm is not None else h)
            loss = runner.model.loss_function(logits=logits, labels=labels.reshape(1, -1).to(runner.device),
                                              vocab_size=logits.shape[-1])
            loss.backward()
        return h.grad

    def _block_backward(self, i, block, x, call, grad_out):
        """(∂L/∂ block i's input, [H] Σ (∂L/∂A)² of its attention): the block run again on its input ``x``."""
        args, kwargs = call
        maps = []
        with torch.enable_grad(), self._hooks(i, block, on_attention=lambda b, a: maps.append(a)):
            x = x.detach().to(self.runner.device).requires_grad_(True)
            out = block(x, *args, **kwargs)
            out = out[0] if isinstance(out, tuple) else out
            for a in maps:
                a.retain_grad()
            out.backward(grad_out)
        g = maps[0].grad if maps[0].grad is not None else torch.zeros_like(maps[0])
        return x.grad, S.attention_sensitivity(g[:1].float())[0].cpu()
