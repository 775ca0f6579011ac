"""The levers that won in one GPU check, together: the one throughput row that still needs a device.

    python -m benchmarks.combine --results DIR [--plan FILE]

``DIR`` holds the throughput stages' reports of ``benchmarks/gpu_check.sh`` (``throughput.json`` and those of the
lever stages before it). Each lever stage times LoMaR-B/16 at 224 with one lever changed against a row of the
``throughput`` stage measured in the same call:

- the attention: SDPA with the iRPE bias (the default), FlexAttention (``attention_flex``) or the warp-tiled
  kernels (``attention_mma``);
- the compile scope: compiled blocks (``compile``) or the whole model (``compile-model``);
- the iRPE bias in SDPA's aligned layout (``irpe_aligned``, compiled blocks; it only applies to SDPA);
- micro-batch 512 (``batch512``).

The combination takes the scope of the fastest row, the fastest attention at that scope, and each other lever
that beat its own baseline. Where a stage measured that combination already (one lever or none won), nothing is
printed; otherwise two lines: the environment settings (``NAME=value`` words, maybe none) and the throughput
benchmark's arguments for the row. ``--plan`` writes the choice and its reasons as JSON either way.
"""
from __future__ import annotations

import argparse
import json
from dataclasses import dataclass
from pathlib import Path

SIZE = 224
BASE_BATCH, LARGE_BATCH = "default", 512  # the micro-batch of a row: the benchmark's default, or the batch512 stage's
# a lever stage's report -> (attention, iRPE layout, micro-batch) of its rows; its variants give the scope
STAGE_SETTINGS = {"throughput": ("sdpa", "bmm", BASE_BATCH), "attention_flex": ("flex", "bmm", BASE_BATCH),
                  "attention_mma": ("mma", "bmm", BASE_BATCH), "irpe_aligned": ("sdpa", "bmm_aligned", BASE_BATCH),
                  "batch512": ("sdpa", "bmm", LARGE_BATCH)}
SCOPES = {"compile": "blocks", "compile-model": "model", "compile+kernels": "blocks",
          "compile-model+kernels": "model"}
ENV = {("attention", "flex"): ("LOMAR_ATTN_PATH", "flex"), ("attention", "mma"): ("LOMAR_WA_KERNEL", "mma"),
       ("irpe", "bmm_aligned"): ("LOMAR_IRPE_PATH", "bmm_aligned")}


@dataclass(frozen=True)
class Row:
    attention: str
    irpe: str
    scope: str
    batch: int | str
    images_per_sec: float
    batch_size: int = 0  # as run (the CPU rehearsal runs every row at its own small batch)

    def settings(self) -> tuple:
        return self.attention, self.irpe, self.scope, self.batch

    def describe(self) -> str:
        return f"{self.attention}, iRPE {self.irpe}, {self.scope} compiled, micro-batch {self.batch_size}"


def read_rows(results: Path) -> list[Row]:
    """The timed LoMaR rows at 224 of each lever stage's report in ``results`` (missing reports are skipped)."""
    rows = []
    for stage, (attention, irpe, batch) in STAGE_SETTINGS.items():
        path = results / f"{stage}.json"
        if not path.is_file():
            continue
        for r in json.loads(path.read_text()).get("results", []):
            scope = SCOPES.get(r.get("variant"))
            if (r.get("kind") != "lomar" or r.get("size") != SIZE or scope is None or r.get("status") != "ok"
                    or not r.get("images_per_sec")):
                continue
            rows.append(Row(attention, irpe, scope, batch, float(r["images_per_sec"]), int(r.get("batch_size") or 0)))
    return rows


def best(rows: list[Row], **match) -> Row | None:
    found = [r for r in rows if all(getattr(r, k) == v for k, v in match.items())]
    return max(found, key=lambda r: r.images_per_sec, default=None)


def choose(rows: list[Row]) -> dict:
    """The combination (``settings``: attention, irpe, scope, batch) and ``why``; ``skip`` says why no row is
    needed (None when one is)."""
    base = [r for r in rows if r.settings()[:2] == ("sdpa", "bmm") and r.batch == BASE_BATCH]
    if not base:
        return {"skip": "no baseline row (the throughput stage's LoMaR 224) was measured", "why": []}
    top = max(rows, key=lambda r: r.images_per_sec)
    scope, why = top.scope, [f"fastest row: {top.describe()}, {top.images_per_sec:.0f} img/s"]
    attention = best(rows, scope=scope, batch=BASE_BATCH, irpe="bmm")
    choice = {"attention": attention.attention if attention else "sdpa", "irpe": "bmm", "scope": scope,
              "batch": BASE_BATCH}
    for lever, value, match, against in (
            ("irpe", "bmm_aligned", dict(attention="sdpa", irpe="bmm_aligned", batch=BASE_BATCH, scope="blocks"),
             dict(attention="sdpa", irpe="bmm", batch=BASE_BATCH, scope="blocks")),
            ("batch", LARGE_BATCH, dict(attention="sdpa", irpe="bmm", batch=LARGE_BATCH, scope=scope),
             dict(attention="sdpa", irpe="bmm", batch=BASE_BATCH, scope=scope))):
        if lever == "irpe" and choice["attention"] != "sdpa":
            continue  # FlexAttention and the kernels take the iRPE term themselves
        won, lost = best(rows, **match), best(rows, **against)
        if won and lost:
            why.append(f"{lever} {value}: {won.images_per_sec:.0f} against {lost.images_per_sec:.0f} img/s")
            if won.images_per_sec > lost.images_per_sec:
                choice[lever] = value
    settings = (choice["attention"], choice["irpe"], choice["scope"], choice["batch"])
    measured = best(rows, **dict(zip(("attention", "irpe", "scope", "batch"), settings)))
    if measured:
        return {"skip": f"measured already: {measured.describe()}, {measured.images_per_sec:.0f} img/s", "why": why,
                "choice": choice}
    return {"skip": None, "why": why, "choice": choice}


def command(choice: dict) -> tuple[list[str], list[str]]:
    """(environment words, throughput arguments) for the chosen row."""
    env = [f"{name}={value}" for key in ("attention", "irpe") if (key, choice[key]) in ENV
           for name, value in [ENV[(key, choice[key])]]]
    variant = "compile-model" if choice["scope"] == "model" else "compile"
    if choice["attention"] == "mma":
        variant += "+kernels"
    batch = ["--lomar_batch", str(LARGE_BATCH)] if choice["batch"] == LARGE_BATCH else []
    return env, ["--models", "lomar", "--sizes", str(SIZE), "--variants", variant, *batch]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--results", required=True, type=Path, help="the folder of the throughput stages' reports")
    p.add_argument("--plan", type=Path, help="write the choice and its reasons here (JSON)")
    args = p.parse_args(argv)
    plan = choose(read_rows(args.results))
    if plan["skip"] is None:
        plan["env"], plan["args"] = command(plan["choice"])
        print(" ".join(plan["env"]))
        print(" ".join(plan["args"]))
    if args.plan:
        args.plan.parent.mkdir(parents=True, exist_ok=True)
        args.plan.write_text(json.dumps(plan, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
