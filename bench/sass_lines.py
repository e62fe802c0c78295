"""Where a CUDA kernel's instructions and stalls go, per source line: an Nsight Compute
source-page export joined to an nvdisasm listing with line info.

    python bench/sass_lines.py LISTING PROFILE KERNEL [--top N] [--regions FILE:A-B:NAME ...]

- LISTING: ``nvdisasm -g -c kernels.cubin`` of the same build (``-lineinfo`` is on in
  CMakeLists.txt).  The cubin can come from the installed ``_C`` (``cuobjdump -xelf all``) or
  from compiling the .cu for the same arch: ``nvcc -O3 -lineinfo -arch=sm_90 -cubin
  -std=c++17 -Icsrc csrc/din_cuda_tc.cu``.  The script checks that the two instruction
  streams agree opcode by opcode.
- PROFILE: ``ncu --clock-control none --kernel-name regex:din_tc --set full --import-source
  yes -o prof python3 case.py``, then ``ncu -i prof.ncu-rep --page source --csv
  --print-source sass > prof.csv`` (gzip allowed).  The SASS page carries the per-address
  metrics; the CUDA-source page of that ncu version carried none.
- KERNEL: a substring of the kernel's mangled name in LISTING (e.g.
  ``din_tc_forward_kernelI13__nv_bfloat16``); its first profiled launch is used.

Prints each source line's share of executed instructions and of warp-stall samples, the
top N by stalls, then the same summed over the named regions (lines A..B of FILE).
"""

from __future__ import annotations

import argparse
import collections
import csv
import gzip
import re

INSN = re.compile(r"\s*/\*[0-9a-f]{4,}\*/\s+(@!?U?P\w+\s+)?([A-Z][A-Z0-9_.]+)")


def listing(path: str, kernel: str) -> list[tuple[tuple[str, int] | None, str]]:
    """(source file, line) and opcode of each instruction of the kernel, in address order."""
    out, fn, loc, fns = [], None, None, set()
    with open(path) as f:
        for line in f:
            m = re.match(r"\s*\.text\.(\S+):", line)
            if m:
                fn, loc = m.group(1), None  # a function's first lines carry no location of its own
                if kernel in fn:
                    fns.add(fn)
                continue
            m = re.search(r'//## File "([^"]+)", line (\d+)', line)
            if m:
                loc = (m.group(1).rsplit("/", 1)[-1], int(m.group(2)))
                continue
            m = INSN.match(line)
            if m and fn and kernel in fn:
                out.append((loc, m.group(2).split(".")[0]))
    if len(fns) > 1:
        raise SystemExit(f"{kernel!r} names {len(fns)} functions of the listing: give more of the name")
    return out


def profile(path: str, kernel: str) -> tuple[list[str], list[list[str]]]:
    """Header and rows of the first profiled launch whose demangled name matches kernel."""
    m = re.search(r"(din_\w+?_kernel)(I.*)?$", kernel)  # the name without its mangling
    base, targs = (m.group(1), m.group(2) or "") if m else (kernel, "")
    want_bf16, want_half = "bfloat16" in targs, "6__half" in targs
    opener = gzip.open if path.endswith(".gz") else open
    header, rows, state = [], [], "skip"
    with opener(path, "rt") as f:
        for r in csv.reader(f):
            if r and r[0] == "Kernel Name":
                if state == "take":
                    break
                name = r[1]
                ok = base in name and (not want_bf16 or "bfloat16" in name)
                state = "take" if ok and (not want_half or "__half" in name) else "skip"
            elif r and r[0] == "Address":
                header = r
            elif state == "take" and r and r[0].startswith("0x"):
                rows.append(r)
    return header, rows


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("listing")
    ap.add_argument("profile")
    ap.add_argument("kernel")
    ap.add_argument("--top", type=int, default=30)
    ap.add_argument("--regions", nargs="*", default=[], help="FILE:A-B:NAME, first match wins")
    a = ap.parse_args(argv)
    insns = listing(a.listing, a.kernel)
    header, rows = profile(a.profile, a.kernel)
    if not insns or not rows:
        raise SystemExit(f"kernel {a.kernel!r}: {len(insns)} instructions in the listing, "
                         f"{len(rows)} in the profile")
    if len(insns) != len(rows):
        raise SystemExit(f"different builds: {len(insns)} instructions in the listing, {len(rows)} profiled")
    ie = header.index("Instructions Executed")
    ss = header.index("Warp Stall Sampling (All Samples)")
    mismatch = sum(op != re.match(r"\s*(@!?U?P\w+\s+)?([A-Z][A-Z0-9_]+)", r[1]).group(2)
                   for (_, op), r in zip(insns, rows))
    if mismatch:
        raise SystemExit(f"different builds: {mismatch} opcodes differ")
    inst, stall = collections.Counter(), collections.Counter()
    for (loc, _), r in zip(insns, rows):
        inst[loc] += int(r[ie].replace(",", "") or 0)
        stall[loc] += int(r[ss].replace(",", "") or 0)
    ti, ts = sum(inst.values()) or 1, sum(stall.values()) or 1
    print(f"{a.kernel}: {len(rows)} instructions, {ti} executed (warp level), {ts} stall samples")
    print(f"{'source line':44s} {'inst %':>7s} {'stalls %':>9s}")
    for loc in sorted(inst, key=lambda k: -stall[k])[: a.top]:
        print(f"{str(loc):44s} {100 * inst[loc] / ti:7.1f} {100 * stall[loc] / ts:9.1f}")
    if a.regions:
        spans = []
        for spec in a.regions:
            f, ab, name = spec.split(":")
            lo, hi = (int(x) for x in ab.split("-"))
            spans.append((f, lo, hi, name))
        ri, rs = collections.Counter(), collections.Counter()
        for loc in inst:
            name = next((n for f, lo, hi, n in spans if loc and loc[0].startswith(f) and lo <= loc[1] <= hi),
                        f"other: {loc[0] if loc else '?'}")
            ri[name] += inst[loc]
            rs[name] += stall[loc]
        print(f"\n{'region':44s} {'inst %':>7s} {'stalls %':>9s}")
        for name in sorted(ri, key=lambda k: -rs[k]):
            print(f"{name:44s} {100 * ri[name] / ti:7.1f} {100 * rs[name] / ts:9.1f}")


if __name__ == "__main__":
    main()
