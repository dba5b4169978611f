"""Draw `bench.kernels` JSON as grouped bars of speed-up over torch eager: `python -m bench.plot_kernels FILE`."""

from __future__ import annotations

import argparse
import json
from pathlib import Path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("json_file")
    parser.add_argument("--out", default=None, help="PNG path (default: beside the JSON)")
    args = parser.parse_args()
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    data = json.loads(Path(args.json_file).read_text())
    rows = data["rows"]
    cases = list(dict.fromkeys(f"{r['kernel']}\n{'x'.join(map(str, r['shape']))}" for r in rows))
    names = [
        name for name in dict.fromkeys(r["provider"] for r in rows) if "[" not in name
    ]  # sweep rows stay in the JSON
    fig, ax = plt.subplots(figsize=(max(8, 1.4 * len(cases)), 4.5))
    width = 0.8 / len(names)
    for k, provider in enumerate(names):
        values = [
            next(
                (
                    r["speedup_vs_eager"]
                    for r in rows
                    if f"{r['kernel']}\n{'x'.join(map(str, r['shape']))}" == c and r["provider"] == provider
                ),
                0.0,
            )
            for c in cases
        ]
        ax.bar([i + k * width for i in range(len(cases))], values, width, label=provider)
    ax.set_xticks([i + width * (len(names) - 1) / 2 for i in range(len(cases))], cases, fontsize=7)
    ax.set_ylabel("speed-up over torch eager")
    ax.set_title(f"adapruner kernels on {data['device']} ({data['dtype']})")
    ax.axhline(1.0, color="gray", lw=0.8)
    ax.legend()
    fig.tight_layout()
    out = Path(args.out or Path(args.json_file).with_suffix(".png"))
    fig.savefig(out, dpi=120)
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
