"""Sequence-to-sequence toy tasks: date normalisation and sequence reversal, character vocabularies, batches.

* :func:`date_task` writes dates in many human formats ("3 March 2021", "march 3, 2021", "03/03/2021",
  "Tue Mar 3 2021", "2021.03.03", "3rd of March, 21", ...) with their ISO form "2021-03-03" as the target.
  Everything is drawn from a seed. The test set is disjoint from training by construction: a random share of
  the calendar's dates never appears in training (in any format), and some (format, month) combinations never
  appear in training either (the month is seen in other formats, the format with other months).
* :func:`reverse_task` makes random letter strings and their reversal.
* :class:`CharVocab` maps characters to ids with PAD (0), SOS (1) and EOS (2) first.
* :func:`pad_batch` pads id sequences into a (batch, length) array; :class:`BucketBatcher` groups examples of
  similar length into buckets with a few fixed padded lengths, so a compiled step sees only a few shapes.
"""
from __future__ import annotations

import datetime as _dt

import numpy as np

__all__ = ["PAD", "SOS", "EOS", "CharVocab", "DATE_FORMATS", "format_date", "date_task", "reverse_task",
           "DateTask", "ReverseTask", "MONTH_STYLES", "pad_batch", "encode_pairs", "BucketBatcher", "Seq2SeqData"]

PAD, SOS, EOS = 0, 1, 2
_SPECIALS = ("<pad>", "<s>", "</s>")

_MONTHS = ("January", "February", "March", "April", "May", "June", "July", "August", "September", "October",
           "November", "December")
_DAYS = ("Monday", "Tuesday", "Wednesday", "Thursday", "Friday", "Saturday", "Sunday")


def _ordinal(n):
    if 10 <= n % 100 <= 20:
        return f"{n}th"
    return f"{n}{ {1: 'st', 2: 'nd', 3: 'rd'}.get(n % 10, 'th') }"


# Each format is (name, function(date) -> text). Numeric formats use one convention each: "/" is
# month/day/year (US), "." after a day is day.month.year; a four-digit year first is always year-month-day.
DATE_FORMATS = (
    ("d MMMM yyyy", lambda d: f"{d.day} {_MONTHS[d.month - 1]} {d.year}"),
    ("dd MMMM yyyy", lambda d: f"{d.day:02d} {_MONTHS[d.month - 1]} {d.year}"),
    ("MMMM d, yyyy", lambda d: f"{_MONTHS[d.month - 1]} {d.day}, {d.year}"),
    ("mmmm d, yyyy", lambda d: f"{_MONTHS[d.month - 1].lower()} {d.day}, {d.year}"),
    ("MMMM-UPPER d yyyy", lambda d: f"{_MONTHS[d.month - 1].upper()} {d.day} {d.year}"),
    ("d MMM yyyy", lambda d: f"{d.day} {_MONTHS[d.month - 1][:3]} {d.year}"),
    ("MMM d, yyyy", lambda d: f"{_MONTHS[d.month - 1][:3]} {d.day}, {d.year}"),
    ("MMM dd yyyy", lambda d: f"{_MONTHS[d.month - 1][:3]} {d.day:02d} {d.year}"),
    ("d-MMM-yyyy", lambda d: f"{d.day}-{_MONTHS[d.month - 1][:3]}-{d.year}"),
    ("mm/dd/yyyy", lambda d: f"{d.month:02d}/{d.day:02d}/{d.year}"),
    ("m/d/yy", lambda d: f"{d.month}/{d.day}/{d.year % 100:02d}"),
    ("dd.mm.yyyy", lambda d: f"{d.day:02d}.{d.month:02d}.{d.year}"),
    ("yyyy.mm.dd", lambda d: f"{d.year}.{d.month:02d}.{d.day:02d}"),
    ("yyyy/m/d", lambda d: f"{d.year}/{d.month}/{d.day}"),
    ("yyyymmdd", lambda d: f"{d.year}{d.month:02d}{d.day:02d}"),
    ("EEE MMM d yyyy", lambda d: f"{_DAYS[d.weekday()][:3]} {_MONTHS[d.month - 1][:3]} {d.day} {d.year}"),
    ("EEEE, MMMM d, yyyy", lambda d: f"{_DAYS[d.weekday()]}, {_MONTHS[d.month - 1]} {d.day}, {d.year}"),
    ("dth of MMMM, yy", lambda d: f"{_ordinal(d.day)} of {_MONTHS[d.month - 1]}, {d.year % 100:02d}"),
    ("the dth of mmmm yyyy", lambda d: f"the {_ordinal(d.day)} of {_MONTHS[d.month - 1].lower()} {d.year}"),
    ("MMMM dth, yyyy", lambda d: f"{_MONTHS[d.month - 1]} {_ordinal(d.day)}, {d.year}"),
    ("yyyy MMMM d", lambda d: f"{d.year} {_MONTHS[d.month - 1]} {d.day}"),
    ("d mmm 'yy", lambda d: f"{d.day} {_MONTHS[d.month - 1][:3].lower()} '{d.year % 100:02d}"),
)

#: how each format writes the month: a (format, month) pair is held out only when another format that writes
#: months the same way keeps that month in training (no spelling is then unseen, e.g. "NOVEMBER" in capitals)
MONTH_STYLES = {
    "d MMMM yyyy": "Month", "dd MMMM yyyy": "Month", "MMMM d, yyyy": "Month", "mmmm d, yyyy": "month",
    "MMMM-UPPER d yyyy": "MONTH", "d MMM yyyy": "Mon", "MMM d, yyyy": "Mon", "MMM dd yyyy": "Mon",
    "d-MMM-yyyy": "Mon", "mm/dd/yyyy": "mm", "m/d/yy": "m", "dd.mm.yyyy": "mm", "yyyy.mm.dd": "mm",
    "yyyy/m/d": "m", "yyyymmdd": "mm", "EEE MMM d yyyy": "Mon", "EEEE, MMMM d, yyyy": "Month",
    "dth of MMMM, yy": "Month", "the dth of mmmm yyyy": "month", "MMMM dth, yyyy": "Month",
    "yyyy MMMM d": "Month", "d mmm 'yy": "mon",
}

#: the calendar the task draws from: two-digit years are unambiguous in it (50-99 -> 19xx, 00-49 -> 20xx)
FIRST_DATE, LAST_DATE = _dt.date(1950, 1, 1), _dt.date(2049, 12, 31)


def format_date(date, fmt):
    """Return ``date`` (a datetime.date) written in format ``fmt`` (an index into DATE_FORMATS or its name)."""
    if isinstance(fmt, str):
        names = [n for n, _ in DATE_FORMATS]
        if fmt not in names:
            raise KeyError(f"format_date: unknown format {fmt!r}; known: {', '.join(names)}")
        fmt = names.index(fmt)
    if not 0 <= int(fmt) < len(DATE_FORMATS):
        raise IndexError(f"format_date: format index {fmt} is out of range [0, {len(DATE_FORMATS)})")
    return DATE_FORMATS[int(fmt)][1](date)


class CharVocab:
    """Characters <-> ids with the specials PAD=0, SOS=1, EOS=2 first, then the characters in sorted order."""

    def __init__(self, chars):
        chars = sorted(set(chars))
        self.itos = list(_SPECIALS) + chars
        self.stoi = {c: i + len(_SPECIALS) for i, c in enumerate(chars)}

    @classmethod
    def from_texts(cls, texts):
        """Return the vocabulary of every character in ``texts``."""
        s = set()
        for t in texts:
            s.update(t)
        return cls(s)

    def __len__(self):
        return len(self.itos)

    def encode(self, text, eos=False, sos=False):
        """Return the ids (int64) of ``text``, optionally with SOS first and/or EOS last; KeyError on a new char."""
        try:
            ids = [self.stoi[c] for c in text]
        except KeyError as e:
            raise KeyError(f"CharVocab.encode: character {e.args[0]!r} of {text!r} is not in the vocabulary") \
                from None
        if sos:
            ids = [SOS] + ids
        if eos:
            ids = ids + [EOS]
        return np.asarray(ids, np.int64)

    def decode(self, ids, strip=True):
        """Return the text of ``ids``; with ``strip`` stop at the first EOS and drop PAD and SOS."""
        out = []
        for i in np.asarray(ids).reshape(-1):
            i = int(i)
            if strip:
                if i == EOS:
                    break
                if i in (PAD, SOS):
                    continue
            out.append(self.itos[i] if 0 <= i < len(self.itos) else "?")
        return "".join(out)

    def tokens(self, ids):
        """Return the list of token strings of ``ids`` (specials by name), for plots."""
        return [self.itos[int(i)] for i in np.asarray(ids).reshape(-1)]


class Seq2SeqData:
    """Source and target texts of a split (lists of str), with extra per-example info (e.g. the format id)."""

    def __init__(self, sources, targets, info=None):
        if len(sources) != len(targets):
            raise ValueError(f"Seq2SeqData: {len(sources)} sources but {len(targets)} targets")
        self.sources, self.targets = list(sources), list(targets)
        self.info = info

    def __len__(self):
        return len(self.sources)

    def __getitem__(self, i):
        return self.sources[i], self.targets[i]


class DateTask:
    """A generated date-normalisation task: ``train`` / ``test`` splits and the two character vocabularies."""

    name = "dates"

    def __init__(self, train, test, src_vocab, tgt_vocab, held_dates, held_combos):
        self.train, self.test = train, test
        self.src_vocab, self.tgt_vocab = src_vocab, tgt_vocab
        self.held_dates, self.held_combos = held_dates, held_combos

    @property
    def max_target_len(self):
        """Return the target length with EOS (11 for YYYY-MM-DD)."""
        return 11


def date_task(n_train=20000, n_test=2000, seed=0, held_out_dates=0.1, held_out_combos=1, formats=None):
    """Return a :class:`DateTask` of (human date, ISO date) pairs drawn with ``seed``.

    ``held_out_dates`` is the share of calendar days (1950-2049) kept out of training; ``held_out_combos`` the
    number of months per format whose (format, month) pairs are kept out of training (0 for none), chosen so
    that another format writing months the same way (see MONTH_STYLES) still shows that month in training;
    formats whose month spelling is their own ("NOVEMBER", "nov") hold out no month. The test
    examples are drawn from the held-out space only: a held-out date, or a held-out (format, month) pair.
    ``formats`` restricts the task to some format indices or names (default: all of DATE_FORMATS).
    """
    rng = np.random.default_rng(seed)
    names = [n for n, _ in DATE_FORMATS]
    if formats is None:
        fmts = list(range(len(DATE_FORMATS)))
    else:
        fmts = [names.index(f) if isinstance(f, str) else int(f) for f in formats]
    n_days = (LAST_DATE - FIRST_DATE).days + 1
    if not 0.0 <= held_out_dates < 1.0:
        raise ValueError(f"date_task: held_out_dates must be in [0, 1), got {held_out_dates}")
    if not 0 <= held_out_combos <= 6:
        raise ValueError(f"date_task: held_out_combos must be in [0, 6], got {held_out_combos}")
    held = np.zeros(n_days, bool)
    held[rng.choice(n_days, int(round(held_out_dates * n_days)), replace=False)] = True
    combos = np.zeros((len(DATE_FORMATS), 13), bool)          # [format, month]
    for style in sorted({MONTH_STYLES[names[f]] for f in fmts}):
        group = [f for f in fmts if MONTH_STYLES[names[f]] == style]
        if len(group) < 2:
            continue                                            # its spelling of a month exists nowhere else
        months = rng.permutation(12)
        for i, f in enumerate(group):                           # months spread over the group: none is held
            for j in range(held_out_combos):                    # out by every format of the style
                combos[f, 1 + months[(i * held_out_combos + j) % 12]] = True
    ords = FIRST_DATE.toordinal()

    def draw(n, want_test):
        src, tgt, info = [], [], []
        fmt_arr = np.asarray(fmts)
        while len(src) < n:
            m = max(64, 2 * (n - len(src)))
            days = rng.integers(0, n_days, m)
            fs = fmt_arr[rng.integers(0, len(fmts), m)]
            for day, f in zip(days, fs):
                d = _dt.date.fromordinal(ords + int(day))
                is_test = bool(held[day] or combos[f, d.month])
                if is_test != want_test:
                    continue
                text = format_date(d, int(f))
                if want_test and not held[day] and any(
                        not combos[g, d.month] and format_date(d, g) == text for g in fmts if g != f):
                    continue                # another format writes the same text, and that pair is in training
                src.append(text)
                tgt.append(d.isoformat())
                info.append(int(f))
                if len(src) == n:
                    break
        return Seq2SeqData(src, tgt, np.asarray(info, np.int64))

    train = draw(int(n_train), False)
    test = draw(int(n_test), True)
    all_src_chars = set()
    for f in fmts:                                  # every character any format can write, so none is unseen
        for d in (_dt.date(2000 + k, m, dd) for k in (0, 1) for m in range(1, 13) for dd in (1, 22, 23, 30)
                  if not (m == 2 and dd > 28)):
            all_src_chars.update(format_date(d, f))
    src_vocab = CharVocab(all_src_chars | set("0123456789"))
    tgt_vocab = CharVocab("0123456789-")
    held_combo_list = [(names[f], int(mo)) for f, mo in zip(*np.nonzero(combos))]
    return DateTask(train, test, src_vocab, tgt_vocab, held, held_combo_list)


class ReverseTask:
    """A generated reversal task: ``train`` / ``test`` splits over one shared vocabulary."""

    name = "reverse"

    def __init__(self, train, test, vocab, max_len):
        self.train, self.test = train, test
        self.src_vocab = self.tgt_vocab = vocab
        self.max_len = max_len

    @property
    def max_target_len(self):
        """Return the longest target with EOS."""
        return self.max_len + 1


def reverse_task(n_train=10000, n_test=1000, min_len=3, max_len=12, alphabet="abcdefghijklmnopqrstuvwxyz",
                 seed=0):
    """Return a :class:`ReverseTask`: random strings over ``alphabet`` of length in [min_len, max_len] and their
    reversal; test strings never occur in training."""
    if not 1 <= min_len <= max_len:
        raise ValueError(f"reverse_task: need 1 <= min_len <= max_len, got {min_len}, {max_len}")
    rng = np.random.default_rng(seed)
    letters = np.asarray(list(alphabet))
    possible = sum(len(letters) ** k for k in range(min_len, max_len + 1))
    if n_train + n_test > possible:
        raise ValueError(f"reverse_task: {n_train} + {n_test} distinct strings requested, but only {possible} "
                         f"strings of length {min_len}-{max_len} exist over {len(letters)} letters")

    def draw(n, exclude):
        out, seen = [], set()
        while len(out) < n:
            k = int(rng.integers(min_len, max_len + 1))
            s = "".join(letters[rng.integers(0, len(letters), k)])
            if s in exclude or s in seen:
                continue
            seen.add(s)
            out.append(s)
        return out, seen

    test_src, test_seen = draw(int(n_test), set())
    train_src, _ = draw(int(n_train), test_seen)
    vocab = CharVocab(alphabet)
    return ReverseTask(Seq2SeqData(train_src, [s[::-1] for s in train_src]),
                       Seq2SeqData(test_src, [s[::-1] for s in test_src]), vocab, max_len)


# ----------------------------------------------------------------------------------------------------------------
# padding and bucketing
# ----------------------------------------------------------------------------------------------------------------

def pad_batch(seqs, length=None, pad=PAD, dtype=np.int64):
    """Return (ids (batch, length), lengths (batch,)) with each sequence left-aligned and padded with ``pad``.

    ``length`` defaults to the longest sequence; a sequence longer than ``length`` raises ValueError.
    """
    seqs = [np.asarray(s) for s in seqs]
    lens = np.asarray([len(s) for s in seqs], np.int64)
    if length is None:
        length = int(lens.max()) if len(seqs) else 0
    if len(seqs) and int(lens.max()) > length:
        i = int(np.argmax(lens))
        raise ValueError(f"pad_batch: sequence {i} has length {lens[i]}, longer than the padded length {length}")
    out = np.full((len(seqs), length), pad, dtype)
    for i, s in enumerate(seqs):
        out[i, :len(s)] = s
    return out, lens


def encode_pairs(data, src_vocab, tgt_vocab):
    """Return (source id arrays, target id arrays ending in EOS) of a :class:`Seq2SeqData`."""
    src = [src_vocab.encode(s) for s in data.sources]
    tgt = [tgt_vocab.encode(t, eos=True) for t in data.targets]
    return src, tgt


def _bucket_edges(lengths, n_buckets):
    """Return increasing padded lengths: quantiles of ``lengths``, the last one its maximum."""
    lengths = np.asarray(lengths)
    qs = np.quantile(lengths, np.linspace(0, 1, n_buckets + 1)[1:], method="higher")
    return sorted({int(q) for q in qs} | {int(lengths.max())})


class BucketBatcher:
    """Mini-batches of (source, target) id sequences grouped by source length into a few padded lengths.

    Each example goes to the smallest bucket whose length holds its source; a batch holds examples of one
    bucket, padded to the bucket's source length and to the longest target of the whole dataset (so the
    decoder's length is fixed). ``batches(epoch)`` yields dicts with ``src`` (B, Ts), ``src_len`` (B,),
    ``tgt_in`` (B, Tt) (SOS then the target), ``tgt_out`` (B, Tt) (the target then EOS, PAD after),
    ``tgt_len`` (B,) and the example indices ``index``; the order is shuffled with ``(seed, epoch)``.
    With ``drop_last`` (default) every batch holds exactly ``batch_size`` examples, so shapes stay few.
    """

    def __init__(self, src, tgt, batch_size, n_buckets=3, edges=None, tgt_len=None, seed=0, drop_last=True):
        if len(src) != len(tgt):
            raise ValueError(f"BucketBatcher: {len(src)} sources but {len(tgt)} targets")
        if len(src) == 0:
            raise ValueError("BucketBatcher: no examples")
        self.src, self.tgt = list(src), list(tgt)
        self.batch_size, self.seed, self.drop_last = int(batch_size), seed, drop_last
        slen = np.asarray([len(s) for s in self.src])
        self.edges = sorted(int(e) for e in edges) if edges is not None else _bucket_edges(slen, n_buckets)
        if slen.max() > self.edges[-1]:
            raise ValueError(f"BucketBatcher: a source of length {int(slen.max())} exceeds the largest bucket "
                             f"{self.edges[-1]}")
        tmax = max(len(t) for t in self.tgt)
        self.tgt_len = int(tgt_len) if tgt_len is not None else tmax
        if tmax > self.tgt_len:
            raise ValueError(f"BucketBatcher: a target of length {tmax} exceeds tgt_len={self.tgt_len}")
        self.bucket_of = np.searchsorted(self.edges, slen, side="left")

    def __len__(self):
        n = 0
        for b in range(len(self.edges)):
            k = int((self.bucket_of == b).sum())
            n += k // self.batch_size if self.drop_last else -(-k // self.batch_size)
        return n

    def make_batch(self, idx, src_len=None):
        """Return the batch dict of examples ``idx`` padded to ``src_len`` (default: their bucket's length)."""
        idx = np.asarray(idx)
        if src_len is None:
            src_len = self.edges[int(self.bucket_of[idx].max())]
        return make_batch([self.src[i] for i in idx], [self.tgt[i] for i in idx], src_len, self.tgt_len, idx)

    def batches(self, epoch=0):
        """Yield the batch dicts of one epoch, buckets interleaved in a shuffled order."""
        rng = np.random.default_rng((self.seed, epoch))
        chunks = []
        for b in range(len(self.edges)):
            members = np.nonzero(self.bucket_of == b)[0]
            members = members[rng.permutation(len(members))]
            for i in range(0, len(members), self.batch_size):
                c = members[i:i + self.batch_size]
                if len(c) < self.batch_size and self.drop_last:
                    continue
                chunks.append((b, c))
        for k in rng.permutation(len(chunks)):
            b, c = chunks[k]
            yield make_batch([self.src[i] for i in c], [self.tgt[i] for i in c], self.edges[b], self.tgt_len, c)

    __iter__ = batches


def make_batch(src, tgt, src_len, tgt_len, index=None):
    """Return the batch dict (see :class:`BucketBatcher`) of id sequences ``src`` and ``tgt`` (EOS included)."""
    s, sl = pad_batch(src, src_len)
    t_out, tl = pad_batch(tgt, tgt_len)
    t_in = np.full_like(t_out, PAD)
    t_in[:, 0] = SOS
    t_in[:, 1:] = t_out[:, :-1]
    t_in[t_in == EOS] = PAD                 # the EOS of a full-length target is never an input
    return {"src": s, "src_len": sl, "tgt_in": t_in, "tgt_out": t_out, "tgt_len": tl,
            "index": np.arange(len(src)) if index is None else np.asarray(index)}


__all__ += ["make_batch", "FIRST_DATE", "LAST_DATE"]
