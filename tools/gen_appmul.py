#!/usr/bin/env python3
"""Regenerate the AppMul library (sliver/passes/appmul/library.npz + library.json).

    python tools/gen_appmul.py                 # rewrite the committed library
    python tools/gen_appmul.py --out build/lib # write build/lib.npz and build/lib.json instead
    python tools/gen_appmul.py --check         # exit 1 if the committed library differs

Every multiplier's netlist (passes/appmul/multipliers.py) is simulated on all operand pairs; the
LUTs, error statistics and gate-count energy estimates are written, and a table is printed.
"""

from __future__ import annotations

import argparse
import sys
import time


def main(argv=None) -> int:
    from sliver.passes.appmul import library

    p = argparse.ArgumentParser(prog="gen_appmul.py", description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default=library.DEFAULT_PATH, help="output path without extension")
    p.add_argument("--check", action="store_true", help="compare with the library at --out instead of writing")
    p.add_argument("--quiet", action="store_true")
    args = p.parse_args(argv)
    start = time.perf_counter()
    mults = library.generate()
    took = time.perf_counter() - start
    if args.check:
        same = library.same_as_saved(mults, args.out)
        print("library up to date" if same else f"library at {args.out} differs from regeneration")
        return 0 if same else 1
    library.save(mults, args.out)
    if not args.quiet:
        print(f"{'name':24s} {'MAE':>10s} {'MRE':>8s} {'WCE':>7s} {'bias':>10s} {'area':>8s} {'E_rel':>6s}")
        for m in mults:
            s = m.stats
            print(f"{m.name:24s} {s['mae']:10.3f} {s['mre']:8.4f} {s['wce']:7d} {s['bias']:10.3f} {s['area']:8.1f} {s['energy_rel']:6.3f}")
    print(f"{len(mults)} multipliers generated in {took:.1f} s -> {args.out}.npz/.json")
    return 0


if __name__ == "__main__":
    sys.exit(main())
