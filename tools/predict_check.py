"""Use what you trained, for every model family: fit, export, and predict on a real file two ways.

    python tools/predict_check.py [--families derm ecg sleep ct fundus checker] [--work runs/predict-check]

For each family: a short demo fit of its config (one epoch of a few batches: a check that the chain works, not
a trained model), ``tools/export.py --format mmclin``, then ``mmclin predict --model EXPORT --input FILE`` in a
new process and ``lightning predict -c CONFIG --ckpt_path CKPT --data.init_args.predict FILE`` on the same file.
The files are real ones from ``../shared/data`` (an ISIC photograph, a PTB-XL/CinC 2021 record at 500 Hz, the
TotalSegmentator CT, an IDRiD photograph) and a report written by hand (``tests/fixtures/reports``); sleep
uses a night of the generated Sleep-EDF demo, as no PSG ships in ``../shared/data``. A table of the answers
and whether the two routes agree is printed and written to ``WORK/predict-check.md``; the exit code is 1
when a route fails or they disagree.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SHORT_FIT = ["--trainer.max_epochs", "1", "--trainer.limit_train_batches", "2", "--trainer.limit_val_batches", "1",
             "--trainer.num_sanity_val_steps", "0", "--trainer.enable_progress_bar", "false", "--test_after_fit",
             "false"]


@dataclass
class Family:
    config: str
    input: str  # relative to the shared data folder, or "fixture:..." / "demo:sleep"
    question: str | None = None
    choices: list[str] | None = None
    data: list[str] = field(default_factory=list)  # datamodule overrides for a small demo


FAMILIES = {
    "derm": Family("derm-clip.yaml", "derm_isic_sample/full_res/ISIC_0000000.jpg"),
    "ecg": Family("ecg-qa-softprompt.yaml", "ptbxl_cinc2021_sample/HR06001", "Does this ECG show sinus rhythm?",
                  ["yes", "no"]),
    "sleep": Family("sleep-qa-softprompt.yaml", "demo:sleep", data=["--data.init_args.demo_subjects", "4",
                                                                    "--data.init_args.demo_hours", "1"]),
    "ct": Family("ct-vqa.yaml", "ct_totalsegmentator_example/example_ct.nii.gz", "Is there a lesion in the liver?",
                 ["yes", "no"]),
    "fundus": Family("fundus-report.yaml", "fundus_idrid_codras/images/0003.jpg"),
    "checker": Family("cxr-error-check-text.yaml", "fixture:reports/left_effusion_hedged.txt"),
}


def _run(command: list[str], log: Path) -> None:
    with open(log, "a") as f:
        f.write("$ " + " ".join(command) + "\n")
        f.flush()
        done = subprocess.run(command, cwd=ROOT, stdout=f, stderr=subprocess.STDOUT)
    if done.returncode != 0:
        tail = log.read_text().strip().splitlines()[-1:] or ["no output"]
        step = " ".join(a for a in command[1:4] if not a.startswith("-"))
        raise RuntimeError(f"{step} failed ({tail[0][:200]}); see {log}")


def _answer(rows: list[dict]) -> str:
    """What a family's rows answer: the class, the chosen option, the generated text, the checker's verdict, or
    for a night the stage counts."""
    if len(rows) > 1 or "epoch" in rows[0].get("meta", {}):
        stages = Counter(_one(r) for r in rows)
        return f"{len(rows)} epochs: " + ", ".join(f"{k} {v}" for k, v in sorted(stages.items()))
    return _one(rows[0])


def _one(row: dict) -> str:
    if "has_error" in row:
        return f"error: {row['fine_type']}" if row["has_error"] else "no error"
    if "probabilities" in row:
        return row["predicted"]
    if row.get("ranked"):
        return row["ranked"]
    return repr(row["generated"].strip()[:60])


def _sleep_night(work: Path) -> Path:
    from datamodules.sleep_qa import SleepQADataModule

    data = SleepQADataModule(demo_subjects=4, demo_hours=1)
    data.prepare_data()
    return sorted(data.root.rglob("*-PSG.edf"))[0]


def check(name: str, family: Family, work: Path, shared: Path) -> dict:
    out = work / name
    out.mkdir(parents=True, exist_ok=True)
    log = out / "log.txt"
    log.write_text("")
    if family.input == "demo:sleep":
        source = _sleep_night(work)
    elif family.input.startswith("fixture:"):
        source = ROOT / "tests" / "fixtures" / family.input.split(":", 1)[1]
    else:
        source = shared / family.input
    if not source.exists() and not source.with_suffix(".hea").exists():
        raise RuntimeError(f"{source}: input not found")
    config = str(ROOT / "configs" / family.config)
    start = time.perf_counter()
    fit_dir = out / "fit"
    _run([sys.executable, "-m", "mmclin", "fit", "-c", config, *SHORT_FIT, *family.data,
          "--trainer.default_root_dir", str(fit_dir), "--trainer.logger.init_args.save_dir", str(fit_dir)], log)
    ckpt = sorted(fit_dir.rglob("last.ckpt"))[-1]
    export = out / "export"
    _run([sys.executable, "tools/export.py", "--format", "mmclin", "--checkpoint", str(ckpt), "--out", str(export)],
         log)
    question = ["--question", family.question] if family.question else []
    choices = ["--choices", ",".join(family.choices)] if family.choices else []
    _run([sys.executable, "-m", "mmclin", "predict", "--model", str(export), "--input", str(source), *question,
          *choices, "--out", str(out / "mmclin-predict.jsonl")], log)
    studies = out / "studies.jsonl"
    study = {"input": str(source)} | ({"question": family.question} if family.question else {}) | (
        {"choices": family.choices} if family.choices else {})
    studies.write_text(json.dumps(study) + "\n")
    predict_dir = out / "lightning-predict"
    _run([sys.executable, "-m", "mmclin", "predict", "-c", config, *family.data, "--ckpt_path", str(ckpt),
          "--data.init_args.predict", str(studies), "--trainer.enable_progress_bar", "false",
          "--trainer.precision", "32-true", "--trainer.default_root_dir", str(predict_dir),
          "--trainer.logger.init_args.save_dir", str(predict_dir)], log)
    ours = [json.loads(line) for line in (out / "mmclin-predict.jsonl").read_text().splitlines()]
    listed = [json.loads(line) for line in sorted(predict_dir.rglob("predictions.jsonl"))[-1].read_text().splitlines()]
    same = [_one(r) for r in ours] == [_one(r) for r in listed]  # row by row (every epoch of a night)
    return {"family": name, "config": family.config, "input": str(source.relative_to(source.parents[1])),
            "mmclin predict (export)": _answer(ours), "lightning predict (checkpoint)": _answer(listed), "same": same,
            "seconds": round(time.perf_counter() - start)}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--families", nargs="+", choices=list(FAMILIES), default=list(FAMILIES))
    p.add_argument("--work", default="runs/predict-check", help="where runs, exports and predictions go")
    p.add_argument("--shared", default=str(ROOT.parent / "shared" / "data"), help="the real sample files")
    args = p.parse_args(argv)
    work, shared = Path(args.work).resolve(), Path(args.shared)
    rows = []
    for name in args.families:
        print(f"[{name}] fit, export, mmclin predict, lightning predict ...", flush=True)
        try:
            rows.append(check(name, FAMILIES[name], work, shared))
        except RuntimeError as err:
            rows.append({"family": name, "config": FAMILIES[name].config, "input": FAMILIES[name].input,
                         "mmclin predict (export)": f"FAILED: {err}", "lightning predict (checkpoint)": "",
                         "same": False, "seconds": ""})
        print(f"[{name}] " + json.dumps(rows[-1]), flush=True)
    head = list(rows[0])
    table = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    table += ["| " + " | ".join(str(r[k]) for k in head) + " |" for r in rows]
    print("\n".join(table))
    (work / "predict-check.md").write_text("\n".join(table) + "\n")
    return 0 if all(r["same"] for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
