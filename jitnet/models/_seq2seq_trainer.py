"""The seq2seq trainer: :class:`Seq2SeqTrainer` (Adam, the jitted training step, batched greedy and beam
decoding, exact-match evaluation) and :func:`beam_search` over a trainer's jitted decoder step.

The model is :class:`jitnet.models.seq2seq.Seq2Seq` (which re-exports both names).
"""
from __future__ import annotations

import numpy as np

import jitnet as jn
import jitnet.nn.functional as F
from jitnet.data import seq_tasks as T
from jitnet.nn import decoding

__all__ = ["Seq2SeqTrainer", "beam_search"]


class Seq2SeqTrainer:
    """Adam on a :class:`Seq2Seq` with one jitted step, plus decoding and exact-match evaluation.

    The step (``jitnet.jit``, compiled once per source bucket length) is: forward with teacher forcing, the
    padding-masked loss, backward, ``clip_by_global_norm`` of all gradients to ``clip_norm`` and the Adam
    update. With ``num_sampled`` > 0 the loss is a sampled softmax whose candidates are drawn per step outside
    the compiled function. ``net`` and ``opt`` are what checkpoints save. ``device`` ('cpu', 'cuda', a jn.Device)
    places the network and the optimizer's state; each batch goes to the device once, before its step, and
    inside the step nothing crosses between host and device (the caller reads the loss afterwards).
    """

    def __init__(self, net, src_vocab, tgt_vocab, lr=1e-3, clip_norm=5.0, num_sampled=0, max_len=None,
                 eval_batch=256, jit=True, device=None):
        self.device = jn.device(device or "cpu")
        self.net = net.to(self.device)        # the optimizer's slots follow its parameters
        self.src_vocab, self.tgt_vocab = src_vocab, tgt_vocab
        self.opt = jn.optim.Adam(net.parameters(), lr=lr)
        self.clip_norm, self.num_sampled = float(clip_norm), int(num_sampled)
        if self.num_sampled >= net.tgt_vocab:
            raise ValueError(f"Seq2SeqTrainer: num_sampled={self.num_sampled} must be less than the target "
                             f"vocabulary ({net.tgt_vocab})")
        self.max_len = max_len
        self.eval_batch = int(eval_batch)
        self.jit = jit
        self._step = jn.jit(self._train_step) if jit else self._train_step
        self._greedy = jn.jit(self._greedy_fn) if jit else self._greedy_fn
        self._encode = jn.jit(self._encode_fn) if jit else self._encode_fn
        self._dstep = jn.jit(self._decode_step_fn) if jit else self._decode_step_fn

    # -- the compiled functions ----------------------------------------------------------------------------------
    def _train_step(self, src, src_mask, tgt_in, tgt_out, *sampled):
        self.opt.zero_grad()
        loss = self.net.loss(src, src_mask, tgt_in, tgt_out, tuple(sampled) or None, self.num_sampled)
        loss.backward()
        norm = self.opt.clip_grad_norm(self.clip_norm)
        self.opt.step()
        return loss, norm

    def _greedy_fn(self, src, src_mask, max_len):
        return self.net.greedy(src, src_mask, max_len)

    def _encode_fn(self, src, src_mask):
        with jn.no_grad():
            return self.net.encode_for_decoding(src, src_mask)

    def _decode_step_fn(self, states, tokens, att_in, src_mask):
        with jn.no_grad():
            return self.net.decode_step(states, tokens, att_in, src_mask)

    # -- training ----------------------------------------------------------------------------------------------
    def step_inputs(self, batch):
        """Return the step's tensors (src, src_mask, tgt_in, tgt_out) of a batch dict (see ``make_batch``)."""
        src, mask = self.net.source_arrays(batch["src"], batch["src_len"])
        dev = self.device
        return [jn.tensor(src, device=dev), jn.tensor(mask, device=dev),
                jn.tensor(np.ascontiguousarray(batch["tgt_in"]), device=dev),
                jn.tensor(np.ascontiguousarray(batch["tgt_out"]), device=dev)]

    def train_step(self, batch):
        """Run one optimization step on a batch dict; return (loss, global gradient norm before clipping)."""
        self.net.train()
        args = self.step_inputs(batch)
        if self.num_sampled:
            labels = np.asarray(batch["tgt_out"], np.int64).T.reshape(-1, 1)
            args += [t.to(self.device) for t in F.log_uniform_candidate_sampler(
                jn.tensor(labels), 1, self.num_sampled, True, self.net.tgt_vocab)]
        return self._step(*args)

    # -- decoding ------------------------------------------------------------------------------------------------
    def _source_batch(self, sources, length=None):
        ids = [s if isinstance(s, np.ndarray) else self.src_vocab.encode(s) for s in sources]
        padded, lens = T.pad_batch(ids, length)
        return self.net.source_arrays(padded, lens)

    def greedy_decode(self, sources, max_len=None, return_weights=False, src_len=None):
        """Return the greedy decodings (strings) of ``sources`` (strings or id arrays), batched and jitted.

        Batches are padded to ``eval_batch`` rows and to ``src_len`` (default: the longest source) so that
        one compiled decoder serves every batch. With ``return_weights`` also return the attention weights
        (T, S) of each example (over the padded, possibly reversed, source).
        """
        max_len = int(max_len or self.max_len or 32)
        n = len(sources)
        if n == 0:
            return ([], []) if return_weights else []
        ids = [s if isinstance(s, np.ndarray) else self.src_vocab.encode(s) for s in sources]
        length = int(src_len or max(len(i) for i in ids))
        self.net.eval()
        out, weights = [], []
        bs = min(self.eval_batch, n) if not self.jit else self.eval_batch
        for i in range(0, n, bs):
            chunk = ids[i:i + bs]
            k = len(chunk)
            if k < bs:
                chunk = chunk + [chunk[0]] * (bs - k)               # fixed shape: one compiled decoder
            src, mask = self._source_batch(chunk, length)
            toks, ws = self._greedy(jn.tensor(src, device=self.device), jn.tensor(mask, device=self.device), max_len)
            toks = toks.numpy()
            for j in range(k):
                out.append(self.tgt_vocab.decode(toks[j]))
            if return_weights:
                wn = ws.numpy()
                weights.extend(wn[j].copy() for j in range(k))
        self.net.train()
        return (out, weights) if return_weights else out

    def beam_decode(self, sources, beam_size=4, max_len=None, length_penalty=0.0):
        """Return the beam-search decodings (strings) of ``sources`` (see :func:`beam_search`)."""
        max_len = int(max_len or self.max_len or 32)
        src, mask = self._source_batch(sources)
        res = beam_search(self, src, mask, beam_size, max_len, length_penalty)
        return [self.tgt_vocab.decode(toks) for toks, _ in res]

    def evaluate(self, data, limit=None, max_len=None):
        """Return {"exact_match", "char_accuracy", "n"} of greedy decoding on a Seq2SeqData split."""
        srcs, tgts = data.sources, data.targets
        if limit is not None:
            srcs, tgts = srcs[:limit], tgts[:limit]
        pred = self.greedy_decode(srcs, max_len)
        exact = sum(p == t for p, t in zip(pred, tgts))
        chars = sum(sum(a == b for a, b in zip(p, t)) for p, t in zip(pred, tgts))
        total = sum(max(len(p), len(t)) for p, t in zip(pred, tgts))
        n = max(len(tgts), 1)
        return {"exact_match": exact / n, "char_accuracy": chars / max(total, 1), "n": len(tgts)}


def _rows(x, idx):
    """Return tensor x with its rows taken at NumPy indices ``idx`` (a new tensor)."""
    return jn.tensor(np.ascontiguousarray(x.numpy()[idx]), device=x.device)


def beam_search(trainer, src, src_mask, beam_size=4, max_len=20, length_penalty=0.0):
    """Return [(tokens, score)] per source row: the best hypothesis of a beam search of width ``beam_size``.

    ``src`` / ``src_mask`` are NumPy arrays (B, S) as :meth:`Seq2Seq.source_arrays` returns them. A hypothesis
    is finished when it emits EOS (included in its tokens) or reaches ``max_len`` tokens; PAD and SOS are never
    emitted; ranking and early stop are :func:`jitnet.nn.decoding.beam_search`'s. The encoder and one decoder
    step over all B * beam_size rows are jitted functions of ``trainer`` (a :class:`Seq2SeqTrainer`).
    """
    k = int(beam_size)
    if k < 1:
        raise ValueError(f"beam_search: beam_size must be >= 1, got {beam_size}")
    src = np.asarray(src, np.int64)
    mask = np.asarray(src_mask, np.uint8)
    bsz = src.shape[0]
    rep = np.repeat(np.arange(bsz), k)
    dev = trainer.device
    states, att_in = trainer._encode(jn.tensor(src, device=dev), jn.tensor(mask, device=dev))
    states = tuple(_rows(s, rep) for s in states)
    att_in = tuple(_rows(a, rep) if a.ndim == 3 else a for a in att_in)
    mask_r = jn.tensor(np.ascontiguousarray(mask[rep]), device=dev)

    def step(states, tokens):
        states, logp, _ = trainer._dstep(states, jn.tensor(tokens, device=dev), att_in, mask_r)
        return states, logp.numpy()
    return decoding.beam_search(step, states, lambda states, rows: tuple(_rows(s, rows) for s in states), bsz,
                                k, max_len, sos=T.SOS, eos=T.EOS, banned=(T.PAD, T.SOS),
                                length_penalty=length_penalty)
