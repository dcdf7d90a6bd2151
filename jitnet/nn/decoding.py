"""Decoding helpers for sequence models: beam search around a step function, and exhaustive search (its check).

The model supplies the step (a jitted function of its own, usually); the bookkeeping of beams, finished
hypotheses and scores is NumPy here. See :func:`jitnet.models.seq2seq.beam_search` for a model using them.
"""
from __future__ import annotations

import itertools

import numpy as np

__all__ = ["beam_search", "enumerate_sequences"]


def beam_search(step, states, take, bsz, beam_size=4, max_len=20, *, sos, eos, banned=(), length_penalty=0.0):
    """Return [(tokens, score)] per batch row: the best hypothesis of a beam search of width ``beam_size``.

    ``states`` are the decoder states of ``bsz * beam_size`` rows (row ``b * beam_size + j`` is beam j of
    batch row b; every beam starts from its row's state); ``step(states, tokens)`` feeds ``tokens``
    (``bsz * beam_size`` int64) and returns ``(new states, log-probabilities (bsz * beam_size, V))`` (NumPy or
    anything ``np.asarray`` reads); ``take(states, rows)`` returns the states of the given rows (NumPy int64).
    Decoding starts from ``sos``; a hypothesis is finished when it emits ``eos`` (included in its tokens) or
    reaches ``max_len`` tokens; the ``banned`` ids are never emitted. Its score is the sum of the token
    log-probabilities; hypotheses are ranked by ``score / len ** length_penalty`` (0: the plain sum). With
    length_penalty 0 a row stops as soon as its best finished score beats every live beam (scores only fall),
    so with a beam at least as wide as the number of hypotheses the result is the exact optimum.
    """
    k = int(beam_size)
    if k < 1:
        raise ValueError(f"beam_search: beam_size must be >= 1, got {beam_size}")
    scores = np.full((bsz, k), -np.inf)
    scores[:, 0] = 0.0
    hist = np.zeros((bsz, k, 0), np.int64)
    tokens = np.full(bsz * k, sos, np.int64)
    finished = [[] for _ in range(bsz)]
    done = np.zeros(bsz, bool)
    banned = list(banned)

    def rank(score, n):
        return score / (n ** length_penalty) if length_penalty else score

    for t in range(max_len):
        states, logp = step(states, tokens)
        lp = np.asarray(logp).astype(np.float64).reshape(bsz, k, -1)
        for tok in banned:
            lp[:, :, tok] = -np.inf
        vsz = lp.shape[2]
        cand = scores[:, :, None] + lp
        last = t == max_len - 1
        new_scores = np.full((bsz, k), -np.inf)
        parents = np.zeros((bsz, k), np.int64)
        new_tok = np.full((bsz, k), eos, np.int64)
        for b in range(bsz):
            if done[b]:
                continue
            flat = cand[b].reshape(-1)
            order = np.argsort(-flat, kind="stable")
            j = nfin = 0
            for idx in order:
                sc = flat[idx]
                if not np.isfinite(sc) or j == k or (last and nfin == k):
                    break
                p, tok = divmod(int(idx), vsz)
                if tok == eos or last:
                    seq = list(hist[b, p]) + [tok]
                    finished[b].append((rank(sc, len(seq)), sc, seq))
                    nfin += 1
                else:
                    new_scores[b, j], parents[b, j], new_tok[b, j] = sc, p, tok
                    j += 1
            alive = new_scores[b][np.isfinite(new_scores[b])]
            if last or alive.size == 0:
                done[b] = True
            elif finished[b] and not length_penalty and max(f[1] for f in finished[b]) >= alive.max():
                done[b] = True
            if done[b]:
                new_scores[b] = -np.inf
        if done.all():
            break
        hist = np.concatenate([np.take_along_axis(hist, parents[:, :, None], 1), new_tok[:, :, None]], axis=2)
        scores = new_scores
        rows = (np.arange(bsz)[:, None] * k + parents).reshape(-1)
        states = take(states, rows)
        tokens = new_tok.reshape(-1)
    out = []
    for b in range(bsz):
        if not finished[b]:
            out.append(([], -np.inf))
            continue
        best = max(finished[b], key=lambda f: f[0])
        out.append(([int(x) for x in best[2]], float(best[1])))
    return out


def enumerate_sequences(tokens, max_len, eos, limit=200000):
    """Return every hypothesis :func:`beam_search` can finish with: some ``tokens`` then ``eos``, or ``max_len``
    tokens (for an exhaustive check of a beam search on tiny vocabularies); ValueError past ``limit``."""
    toks = list(tokens)
    seqs = []
    for n in range(max_len + 1):
        for body in itertools.product(toks, repeat=n):
            seqs.append(list(body) + [eos] if n < max_len else list(body))
    if len(seqs) > limit:
        raise ValueError(f"exhaustive_search: {len(seqs)} sequences is too many; use a smaller vocabulary or "
                         f"max_len")
    return seqs
