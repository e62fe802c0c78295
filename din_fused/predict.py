"""Score requests with a saved model: ``python -m din_fused.predict --model PATH --input IN --output OUT``.

Input: JSON Lines, one request per line (blank lines are ignored)::

    {"user": 7, "history": [1, 50, 2571], "candidates": [296, 318], "context": {"slot": 3}}

* ``history``: raw item ids (MovieLens movieIds, synthetic item ids), oldest
  first; the latest ``max_len`` known ones are used (``max_len`` from the
  checkpoint).
* ``candidates``: raw item ids to score against that history (may be empty).
* ``context`` (optional): raw ids of the model's context features by name.
* Any other key is copied to the output unchanged.

Output: the same objects, in the same order, each with ``"scores"``: one click
probability per candidate, in order.  Other attributes of an item (e.g. its
genre) come from the vocabulary saved with the model.

Unknown ids (not in the training vocabulary):

* in ``history``: dropped, i.e. treated as padding; the history is the known
  items only (an unknown behaviour carries no learnt embedding);
* in ``candidates``: scored with the padding row (id 0, a zero embedding) for
  every attribute; the score then reflects the history and context only;
* in ``context`` (or a missing context feature): the padding row.

The counts are reported on stderr at the end.

Each request's history is embedded and read once for all its candidates
(:meth:`din_fused.model.DIN.score_shared`).  Requests are scored in chunks of
about ``--batch-size`` candidates; progress is shown on stderr.

A malformed line stops the run with an error naming the line number, and
nothing is written; ``--skip-malformed`` skips such lines instead (they are
absent from the output) and reports how many.  The output is written to a
temporary file beside it and renamed at the end, so it is never half-written.

Exit status: 0 on success, 2 on bad flags, a bad checkpoint or a malformed line.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path

import torch
from tqdm import tqdm

from ._atomic import atomic_write
from .model import Checkpoint, load_checkpoint
from .train import ConfigError, _resolve_device

__all__ = ["RequestError", "Scorer", "main"]

PROG = "python -m din_fused.predict"


class RequestError(ValueError):
    """A request line that cannot be scored; the message names the line."""


def _id_list(obj: dict, key: str, line: int) -> list[int]:
    v = obj.get(key)
    if not isinstance(v, list) or not all(isinstance(x, int) and not isinstance(x, bool) for x in v):
        raise RequestError(f"line {line}: {key!r} must be a list of integer ids, got {json.dumps(v)[:80]}")
    return v


class Scorer:
    """Maps raw-id requests to model rows and scores them; the library side of the CLI.

    ckpt: a :class:`~din_fused.model.Checkpoint` with a vocabulary.
    """

    def __init__(self, ckpt: Checkpoint, device: torch.device | str = "cpu"):
        if ckpt.vocab is None:
            raise ValueError("the checkpoint has no id vocabulary; save it with vocab= (train --save does)")
        self.model = ckpt.model.to(device).eval()
        self.device = torch.device(device)
        self.max_len = ckpt.max_len
        self.item_rows = ckpt.vocab.item_rows()
        self.item_attrs = torch.from_numpy(ckpt.vocab.item_attrs)  # [V, A], row 0 all zeros
        self.context_rows = ckpt.vocab.context_rows()
        self.context_names = ckpt.context_names
        self.unknown = {"history": 0, "candidates": 0, "context": 0}

    def parse(self, text: str, line: int) -> dict:
        """One JSON line -> the request object (validated); raises :class:`RequestError`."""
        try:
            obj = json.loads(text)
        except json.JSONDecodeError as e:
            raise RequestError(f"line {line}: not valid JSON ({e.msg} at column {e.colno})") from None
        if not isinstance(obj, dict):
            raise RequestError(f"line {line}: expected a JSON object, got {type(obj).__name__}")
        _id_list(obj, "history", line)
        _id_list(obj, "candidates", line)
        ctx = obj.get("context", {})
        if not isinstance(ctx, dict) or not all(
            isinstance(v, int) and not isinstance(v, bool) for v in ctx.values()
        ):
            raise RequestError(f"line {line}: 'context' must map feature names to integer ids")
        unknown = set(ctx) - set(self.context_names)
        if unknown:
            raise RequestError(
                f"line {line}: unknown context feature(s) {sorted(unknown)}; "
                f"the model has {list(self.context_names)}"
            )
        if "scores" in obj:
            raise RequestError(f"line {line}: the request already has a 'scores' key")
        return obj

    def _rows(self, raw: list[int], kind: str) -> list[int]:
        rows = [self.item_rows.get(x, 0) for x in raw]
        self.unknown[kind] += rows.count(0)
        return rows

    def score(self, requests: Sequence[dict]) -> list[list[float]]:
        """Probabilities per request and candidate, for parsed requests (one model call)."""
        hist_rows, targets, row_seq, contexts = [], [], [], []
        offsets = [0]
        for s, req in enumerate(requests):
            # Unknown history ids are dropped before truncation: the latest max_len *known* behaviours.
            h = [r for r in self._rows(req["history"], "history") if r != 0][-self.max_len :]
            hist_rows += h
            offsets.append(offsets[-1] + len(h))
            cand = self._rows(req["candidates"], "candidates")
            targets += cand
            row_seq += [s] * len(cand)
            ctx = req.get("context", {})
            ids = []
            for name, rows in zip(self.context_names, self.context_rows):
                r = rows.get(ctx[name], 0) if name in ctx else 0
                self.unknown["context"] += r == 0
                ids.append(r)
            contexts += [ids] * len(cand)
        if not targets:
            return [[] for _ in requests]
        dev = self.device
        ia = self.item_attrs
        logits = self.model.score_shared(
            ia[torch.tensor(targets, dtype=torch.int64)].to(dev),
            ia[torch.tensor(hist_rows, dtype=torch.int64)].reshape(-1, ia.shape[1]).to(dev),
            torch.tensor(offsets, dtype=torch.int64, device=dev),
            torch.tensor(row_seq, dtype=torch.int64, device=dev),
            torch.tensor(contexts, dtype=torch.int64, device=dev).reshape(len(targets), -1)
            if self.context_names
            else None,
        )
        probs = torch.sigmoid(logits.float()).cpu().tolist()
        out, i = [], 0
        for req in requests:
            n = len(req["candidates"])
            out.append(probs[i : i + n])
            i += n
        return out


def _chunks(lines: Iterable[tuple[int, dict]], batch_size: int) -> Iterator[list[tuple[int, dict]]]:
    chunk, n = [], 0
    for item in lines:
        chunk.append(item)
        n += len(item[1]["candidates"])
        if n >= batch_size:
            yield chunk
            chunk, n = [], 0
    if chunk:
        yield chunk


def run(
    scorer: Scorer,
    input_path: Path,
    output_path: Path,
    *,
    batch_size: int = 4096,
    skip_malformed: bool = False,
    progress: bool = True,
) -> dict:
    """Score ``input_path`` into ``output_path`` atomically; returns counts.  Raises :class:`RequestError`."""
    skipped = 0
    total_bytes = input_path.stat().st_size if input_path.is_file() else None

    # Read as bytes and decode line by line, so that text that is not UTF-8 is a malformed line
    # with its number (skipped under skip_malformed), not an error about the whole file.
    with open(input_path, "rb") as fin:
        bar = tqdm(
            total=total_bytes,
            unit="B",
            unit_scale=True,
            desc="scoring",
            disable=not progress,
            file=sys.stderr,
        )

        def requests() -> Iterator[tuple[int, dict]]:
            nonlocal skipped
            for line_no, raw in enumerate(fin, start=1):
                bar.update(len(raw))
                try:
                    try:
                        text = raw.decode("utf-8")
                    except UnicodeDecodeError as e:
                        raise RequestError(f"line {line_no}: not UTF-8 text (byte {e.start + 1})") from None
                    if not text.strip():
                        continue
                    yield line_no, scorer.parse(text, line_no)
                except RequestError:
                    if not skip_malformed:
                        raise
                    skipped += 1

        n_req = n_cand = 0
        try:
            with atomic_write(output_path, "w", encoding="utf-8") as fout:
                for chunk in _chunks(requests(), batch_size):
                    reqs = [r for _, r in chunk]
                    for req, scores in zip(reqs, scorer.score(reqs)):
                        fout.write(json.dumps({**req, "scores": scores}) + "\n")
                        n_req += 1
                        n_cand += len(scores)
        finally:
            bar.close()
    return {
        "requests": n_req,
        "candidates": n_cand,
        "skipped_lines": skipped,
        "unknown_ids": dict(scorer.unknown),
    }


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog=PROG,
        description="Score JSON Lines requests {history, candidates} with a checkpoint of "
        "din_fused.train --save.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("--model", required=True, metavar="PATH", help="checkpoint written by train --save")
    p.add_argument("--input", required=True, metavar="FILE", help="requests, one JSON object per line")
    p.add_argument("--output", required=True, metavar="FILE", help="scored requests (written atomically)")
    p.add_argument("--batch-size", type=int, default=4096, metavar="N", help="candidates per model call")
    p.add_argument(
        "--skip-malformed", action="store_true", help="skip malformed lines (counted) instead of failing"
    )
    p.add_argument("--device", default="cpu", help="auto, cpu, cuda or cuda:N")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    args = p.parse_args(argv)
    if args.batch_size < 1:
        p.error(f"--batch-size must be >= 1, got {args.batch_size}")
    inp, out = Path(args.input), Path(args.output)
    if not inp.is_file():
        print(f"{PROG}: error: --input {inp}: no such file", file=sys.stderr)
        return 2
    if not out.parent.is_dir() or out.is_dir():
        print(f"{PROG}: error: --output {out}: the directory does not exist or the path is a directory",
              file=sys.stderr)
        return 2
    try:
        device = _resolve_device(args.device, 0)
    except ConfigError as e:
        p.error(str(e))
    try:
        scorer = Scorer(load_checkpoint(args.model), device)
    except (ValueError, FileNotFoundError) as e:  # the messages name the file
        print(f"{PROG}: error: --model: {e}", file=sys.stderr)
        return 2
    try:
        counts = run(
            scorer, inp, out, batch_size=args.batch_size, skip_malformed=args.skip_malformed,
            progress=not args.no_progress,
        )
    except RequestError as e:
        print(f"{PROG}: error: {inp}: {e}", file=sys.stderr)
        return 2
    u = counts["unknown_ids"]
    print(
        f"scored {counts['candidates']:,} candidates in {counts['requests']:,} requests -> {out}; "
        f"skipped {counts['skipped_lines']} malformed line(s); unknown ids: {u['history']} in histories "
        f"(dropped), {u['candidates']} candidates and {u['context']} context values (padding row)",
        file=sys.stderr,
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
