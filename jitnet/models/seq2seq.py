"""Sequence-to-sequence with additive (Bahdanau) attention: the model, its trainer and its decoders.

The model (:class:`Seq2Seq`): character embeddings, a multi-layer LSTM or GRU encoder (optionally reading the
source reversed), and a decoder whose cell reads ``[embedding of the previous token; attention context]`` at
every step. The attention query is the decoder's previous top-layer state, its keys and values the encoder
outputs (padding masked out); the output layer sees ``[decoder state; context]``. Training uses teacher
forcing, a padding-masked cross entropy (or a sampled softmax for large vocabularies), gradient clipping by
global norm and Adam, all in one ``jitnet.jit`` step. The encoder and the attention decoder run on
``jn.scan``, so a step compiles once per (bucketed) source length whatever that length is. The recurrent steps
are the fused rows of :mod:`jitnet.nn.attention_decoder` (``lstm_step_fused``, ``additive_attention_step``),
on the CPU or on CUDA.

Decoding: :meth:`Seq2Seq.greedy` is one jitted scan over the output length; :func:`beam_search` runs
:func:`jitnet.nn.decoding.beam_search` around a jitted single decoder step; :func:`exhaustive_search` (tiny
vocabularies only) checks it. :class:`Seq2SeqTrainer` (the jitted training step, batched decoding,
evaluation) and :func:`beam_search` are defined in :mod:`jitnet.models._seq2seq_trainer`; the commands
``python -m jitnet train seq2seq-dates|seq2seq-reverse`` (options, training loop, samples, attention plots) in
:mod:`jitnet.models._seq2seq_cli`.
"""
from __future__ import annotations

import numpy as np

import jitnet as jn
import jitnet.nn as nn
import jitnet.nn.functional as F
from jitnet import ops
from jitnet.autodiff.core import apply
from jitnet.data import seq_tasks as T
from jitnet.nn import decoding
from jitnet.nn.attention_decoder import (ATTN_WEIGHTS, additive_attention_context, additive_attention_step,
                                         additive_attention_tanh, additive_attention_weights, lstm_state,
                                         lstm_step_fused)
from jitnet.tensor import Tensor, _infer_array
from ._seq2seq_trainer import Seq2SeqTrainer, beam_search

__all__ = ["lstm_step_fused", "lstm_state", "additive_attention_step", "additive_attention_weights",
           "additive_attention_tanh", "additive_attention_context", "Seq2Seq", "Seq2SeqTrainer", "beam_search",
           "exhaustive_search", "sequence_log_prob"]


def _t(x):
    return x if isinstance(x, Tensor) else Tensor._wrap(_infer_array(x))


def _gru_step(xw, h, W_hh, b_hh, mask=None):
    """Return the next GRU state from xw = x @ W_ih + b_ih (B, 3H) (PyTorch's equations, gates [r, z, n])."""
    hd = W_hh.shape[0]
    gh = ops.matmul(h, W_hh) + b_hh
    rz = ops.sigmoid(xw[:, :2 * hd] + gh[:, :2 * hd])
    r, z = rz[:, :hd], rz[:, hd:]
    n = ops.tanh(xw[:, 2 * hd:] + r * gh[:, 2 * hd:])
    h2 = n + z * (h - n)
    if mask is not None:
        h2 = ops.where(ops.reshape(mask, (-1, 1)) > 0, h2, h)
    return h2


def _mm(x, W):
    """Return x @ W for x (..., K) as one 2-D GEMM (its weight gradient is then one GEMM too, not one per row)."""
    if x.ndim == 2:
        return ops.matmul(x, W)
    lead = x.shape[:-1]
    y = ops.matmul(ops.reshape(x, (-1, x.shape[-1])), W)
    return ops.reshape(y, lead + (W.shape[-1],))


class Seq2Seq(nn.Module):
    """Encoder-decoder with additive attention over character (or word) ids.

    * encoder: embedding (src_vocab, embed) and ``layers`` LSTM or GRU layers of ``hidden`` units, run with
      ``jn.scan`` under a padding mask (a padded step keeps the state), optionally over the reversed source
      (``reverse_source``: each sequence's valid part is reversed by :meth:`source_arrays`);
    * decoder: embedding (tgt_vocab, embed) and ``layers`` cells whose first layer reads [embedding of the
      previous token; context]; the context comes from :class:`jitnet.nn.BahdanauAttention` (``attention_units``,
      default ``hidden``) queried with the previous top-layer state; the initial decoder state is the
      encoder's final state; logits = [top state; context] @ W_out + b.

    Tensors are batch-first at the interface: ``src`` (B, S) int ids, ``src_mask`` (B, S) nonzero at valid
    positions, ``tgt_in`` / ``tgt_out`` (B, T) (see :func:`jitnet.data.seq_tasks.make_batch`).
    """

    def __init__(self, src_vocab, tgt_vocab, embed=32, hidden=128, layers=1, cell="lstm", attention_units=None,
                 reverse_source=False, dtype=jn.float32):
        super().__init__()
        if cell not in ("lstm", "gru"):
            raise ValueError(f"Seq2Seq: cell must be 'lstm' or 'gru', got {cell!r}")
        if layers < 1:
            raise ValueError(f"Seq2Seq: layers must be >= 1, got {layers}")
        self.src_vocab, self.tgt_vocab = int(src_vocab), int(tgt_vocab)
        self.embed_dim, self.hidden, self.layers, self.cell = int(embed), int(hidden), int(layers), cell
        self.units = int(attention_units or hidden)
        self.reverse_source = bool(reverse_source)
        self.src_embed = nn.Embedding(self.src_vocab, self.embed_dim, dtype=dtype)
        self.tgt_embed = nn.Embedding(self.tgt_vocab, self.embed_dim, dtype=dtype)
        Cell = nn.LSTMCell if cell == "lstm" else nn.GRUCell
        for i in range(self.layers):
            self.add_module(f"encoder_{i}", Cell(self.embed_dim if i == 0 else self.hidden, self.hidden, dtype=dtype))
        for i in range(self.layers):
            d_in = self.embed_dim + self.hidden if i == 0 else self.hidden
            self.add_module(f"decoder_{i}", Cell(d_in, self.hidden, dtype=dtype))
        self.attention = nn.BahdanauAttention(self.hidden, self.hidden, self.units, dtype=dtype)
        self.out = nn.Linear(2 * self.hidden, self.tgt_vocab, dtype=dtype)

    def extra_repr(self):
        return (f"src_vocab={self.src_vocab}, tgt_vocab={self.tgt_vocab}, embed={self.embed_dim}, "
                f"hidden={self.hidden}, layers={self.layers}, cell={self.cell!r}, units={self.units}, "
                f"reverse_source={self.reverse_source}")

    # -- inputs ------------------------------------------------------------------------------------------------
    def source_arrays(self, src, lengths):
        """Return (src ids, uint8 mask) NumPy arrays for padded ``src`` (B, S) with ``lengths`` (reversed if set)."""
        src = np.array(src, dtype=np.int64, copy=True)
        lengths = np.asarray(lengths, np.int64)
        if self.reverse_source:
            for i, n in enumerate(lengths):
                src[i, :n] = src[i, :n][::-1]
        mask = (np.arange(src.shape[1])[None, :] < lengths[:, None]).astype(np.uint8)
        return src, mask

    # -- pieces ------------------------------------------------------------------------------------------------
    def _cells(self, side):
        return [getattr(self, f"{side}_{i}") for i in range(self.layers)]

    def _h(self, state):
        return state[:, :self.hidden] if self.cell == "lstm" else state

    def _zero_state(self, bsz, dtype, device=None):
        width = 6 * self.hidden if self.cell == "lstm" else self.hidden
        return ops.zeros((bsz, width), dtype, device=device)

    def encode(self, src, src_mask):
        """Return (outputs (S, B, H) time-major, final state per layer) of the encoder over src (B, S)."""
        src, m = _t(src), _t(src_mask)
        if src.ndim != 2 or m.shape != src.shape:
            raise ValueError(f"Seq2Seq.encode: src (B, S) and src_mask (B, S) expected, got {src.shape} and "
                             f"{m.shape}")
        if m.dtype != np.uint8:
            m = ops.astype(m != 0, np.uint8)
        x = ops.take(self.src_embed.W, ops.transpose(src), axis=0)           # (S, B, E)
        mt = ops.copy(ops.transpose(m))                         # (S, B), contiguous: scan slices rows of it
        finals = []
        for cell in self._cells("encoder"):
            s0 = self._zero_state(src.shape[0], x.dtype, x.device)
            if self.cell == "lstm":
                xw = _mm(x, cell.W_ih)                                    # every step's input projection: one GEMM

                def body(s, inp, cell=cell):
                    xw_t, m_t = inp
                    # the bias is added per step: the body is then 3 ops, a native segment and loop when the
                    # compiler builds those (runs of fewer steps stay Python calls)
                    s2 = lstm_step_fused(xw_t + cell.b, s, cell.W_hh, m_t)
                    return s2, s2[:, :self.hidden]
            else:
                xw = _mm(x, cell.W_ih) + cell.b_ih

                def body(h, inp, cell=cell):
                    xw_t, m_t = inp
                    h2 = _gru_step(xw_t, h, cell.W_hh, cell.b_hh, m_t)
                    return h2, h2
            s, x = jn.scan(body, s0, (xw, mt))
            finals.append(s)
        return x, finals

    def _attention_inputs(self, enc):
        """Return (values (B, S, H) contiguous, projected keys (B, S, U), score vector v (U,))."""
        att = self.attention
        vals = ops.copy(ops.transpose(enc, (1, 0, 2)))
        pk = _mm(vals, att.key_proj.W) + att.key_proj.b
        return vals, pk, ops.reshape(att.v.W, (-1,))

    def _dec_weights(self):
        c0 = self.decoder_0
        e = self.embed_dim
        b0 = c0.b if self.cell == "lstm" else c0.b_ih
        return c0.W_ih[:e], c0.W_ih[e:], b0

    def _dec_step(self, states, xe_t, att_in, mask, w_c, want_weights=False):
        """One decoder step from the projected input embedding xe_t; return (new states, h_top, ctx[, w])."""
        vals, pk, v = att_in
        if mask.dtype != np.uint8:
            mask = ops.astype(mask != 0, np.uint8)
        q = ops.matmul(self._h(states[-1]), self.attention.query_proj.W)
        th = additive_attention_tanh(q, pk, mask)
        ctx = additive_attention_context(th, v, mask, vals)
        x = xe_t + ops.matmul(ctx, w_c)
        new = []
        for i, cell in enumerate(self._cells("decoder")):
            if i > 0:
                x = ops.matmul(self._h(new[-1]), cell.W_ih) + (cell.b if self.cell == "lstm" else cell.b_ih)
            if self.cell == "lstm":
                new.append(lstm_step_fused(x, states[i], cell.W_hh))
            else:
                new.append(_gru_step(x, states[i], cell.W_hh, cell.b_hh))
        out = (tuple(new), self._h(new[-1]), ctx)
        if want_weights:
            out += (apply(ATTN_WEIGHTS, th, v, mask, vals),)
        return out

    def _logits(self, h, ctx):
        hd = self.hidden
        return _mm(h, self.out.W[:hd]) + _mm(ctx, self.out.W[hd:]) + self.out.b

    def decode_teacher_forced(self, enc, finals, src_mask, tgt_in):
        """Return (top states (T, B, H), contexts (T, B, H)) of the decoder fed the gold previous tokens."""
        m = _t(src_mask)
        if m.dtype != np.uint8:
            m = ops.astype(m != 0, np.uint8)
        att_in = self._attention_inputs(enc)
        w_e, w_c, b0 = self._dec_weights()
        emb = ops.take(self.tgt_embed.W, ops.transpose(_t(tgt_in)), axis=0)     # (T, B, E)
        xe = _mm(emb, w_e) + b0                                                # (T, B, G): one GEMM

        def body(states, xe_t):
            new, h, ctx = self._dec_step(states, xe_t, att_in, m, w_c)
            return new, (h, ctx)
        _, (hs, ctxs) = jn.scan(body, tuple(finals), xe)
        return hs, ctxs

    def forward(self, src, src_mask, tgt_in):
        """Return the teacher-forced logits (B, T, tgt_vocab)."""
        enc, finals = self.encode(src, src_mask)
        hs, ctxs = self.decode_teacher_forced(enc, finals, src_mask, tgt_in)
        return ops.transpose(self._logits(hs, ctxs), (1, 0, 2))

    def loss(self, src, src_mask, tgt_in, tgt_out, sampled=None, num_sampled=0):
        """Return the mean cross entropy over the non-PAD target positions (teacher forcing).

        With ``num_sampled`` > 0 the loss is TensorFlow's sampled softmax over ``num_sampled`` candidates;
        ``sampled`` = (ids, true expected counts, sampled expected counts) from
        ``F.log_uniform_candidate_sampler`` (drawn outside a compiled step).
        """
        enc, finals = self.encode(src, src_mask)
        hs, ctxs = self.decode_teacher_forced(enc, finals, src_mask, tgt_in)
        labels = ops.transpose(_t(tgt_out))                                   # (T, B)
        n_rows = labels.shape[0] * labels.shape[1]
        lab = ops.reshape(labels, (-1,))
        mask = ops.astype(lab != T.PAD, hs.dtype)
        if num_sampled:
            x = ops.reshape(ops.concatenate([hs, ctxs], axis=-1), (n_rows, 2 * self.hidden))
            per = F.sampled_softmax_loss(ops.transpose(self.out.W), self.out.b, ops.reshape(lab, (-1, 1)), x,
                                         num_sampled, self.tgt_vocab, sampled_values=sampled)
        else:
            logits = ops.reshape(self._logits(hs, ctxs), (n_rows, self.tgt_vocab))
            per = F.cross_entropy(logits, lab, reduction="none")
        return ops.sum(per * mask) / ops.maximum(ops.sum(mask), 1.0)

    # -- inference -------------------------------------------------------------------------------------------
    def encode_for_decoding(self, src, src_mask):
        """Return (final states, attention inputs (values, keys, v)) for decoding."""
        enc, finals = self.encode(src, src_mask)
        return tuple(finals), self._attention_inputs(enc)

    def decode_step(self, states, tokens, att_in, src_mask):
        """Return (new states, log-probabilities (B, V), attention weights (B, S)) after feeding ``tokens`` (B,)."""
        w_e, w_c, b0 = self._dec_weights()
        xe = ops.matmul(ops.take(self.tgt_embed.W, _t(tokens), axis=0), w_e) + b0
        new, h, ctx, w = self._dec_step(states, xe, att_in, _t(src_mask), w_c, want_weights=True)
        return new, ops.log_softmax(self._logits(h, ctx), -1), w

    def greedy(self, src, src_mask, max_len):
        """Return (tokens (B, max_len) int64, attention weights (B, max_len, S)) by greedy decoding (a scan).

        Each step feeds back the most likely token (PAD and SOS are never chosen); the tokens after the first
        EOS are whatever the decoder goes on to produce (:meth:`CharVocab.decode` stops at EOS).
        """
        m = _t(src_mask)
        if m.dtype != np.uint8:
            m = ops.astype(m != 0, np.uint8)
        with jn.no_grad():
            states, att_in = self.encode_for_decoding(src, m)
            w_e, w_c, b0 = self._dec_weights()
            bsz = states[0].shape[0]
            tok0 = ops.full((bsz,), T.SOS, np.int64, device=m.device)
            never = np.zeros(self.tgt_vocab, np.float32)
            never[[T.PAD, T.SOS]] = -np.inf                                   # never emitted
            never = jn.tensor(never.astype(states[0].dtype), device=m.device)

            def body(carry, _):
                states, tok = carry
                xe = ops.matmul(ops.take(self.tgt_embed.W, tok, axis=0), w_e) + b0
                new, h, ctx, w = self._dec_step(states, xe, att_in, m, w_c, want_weights=True)
                nxt = ops.argmax(self._logits(h, ctx) + never, axis=-1)
                return (new, nxt), (nxt, w)
            _, (toks, ws) = jn.scan(body, (states, tok0), length=int(max_len))
        return ops.transpose(toks), ops.transpose(ws, (1, 0, 2))


def sequence_log_prob(net, src, src_mask, sequences):
    """Return the log-probability (float64) the model gives each token sequence (ending in EOS or not).

    ``src`` / ``src_mask`` are NumPy (1, S) or (N, S) arrays (one row is repeated for every sequence).
    """
    seqs = [np.asarray(s, np.int64) for s in sequences]
    n = len(seqs)
    src = np.asarray(src, np.int64)
    mask = np.asarray(src_mask, np.uint8)
    if src.shape[0] == 1 and n > 1:
        src, mask = np.repeat(src, n, 0), np.repeat(mask, n, 0)
    length = max(len(s) for s in seqs)
    b = T.make_batch([np.zeros(1)] * n, seqs, 1, length)
    with jn.no_grad():
        dev = net.src_embed.W.device
        logits = net(jn.tensor(src, device=dev), jn.tensor(mask, device=dev), jn.tensor(b["tgt_in"], device=dev))
        lp = ops.log_softmax(logits.astype(np.float64), -1).numpy()
    out = np.zeros(n)
    for i, s in enumerate(seqs):
        out[i] = sum(lp[i, t, tok] for t, tok in enumerate(s))
    return out


def exhaustive_search(net, src, src_mask, max_len, tokens=None):
    """Return (best tokens, score) over every output sequence of at most ``max_len`` tokens (tiny vocabularies).

    A sequence is some non-EOS tokens then EOS, or ``max_len`` non-EOS tokens (the hypotheses of
    :func:`beam_search`). ``tokens`` are the non-special ids to enumerate (default: every id after EOS).
    ``src`` / ``src_mask`` hold one source row (1, S).
    """
    toks = list(range(T.EOS + 1, net.tgt_vocab)) if tokens is None else list(tokens)
    seqs = decoding.enumerate_sequences(toks, max_len, T.EOS)
    scores = sequence_log_prob(net, src, src_mask, seqs)
    i = int(np.argmax(scores))
    return seqs[i], float(scores[i])

