"""`prefixtune compare` on a tiny model saved to disk: a report per method, resume, refusals, option routing."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest
import yaml

from prefixtune import cli
from prefixtune.compare import CompareSettings, plan, report, route_overrides, write_job
from prefixtune.compare.worker import run_job
from prefixtune.config import TrainConfig
from prefixtune.errors import PrefixTuneError
from prefixtune.train import read_metrics, train


def _args(model_dir: Path, data: Path, out: Path, methods: str = "prefix,lora", *extra: str) -> list[str]:
    """One rate per method (--no-sweep) unless `extra` asks for a sweep: the sweep is tests/test_compare_sweep.py's."""
    sweep = any(e in ("--lr-sweep", "--lrs", "--sweep-sizes", "--sweep") for e in extra)
    extra = tuple(e for e in extra if e != "--sweep")
    return [
        "compare",
        "--methods",
        methods,
        "--model",
        str(model_dir),
        "--data",
        str(data),
        "--out",
        str(out),
        "--max-steps",
        "4",
        "--batch-size",
        "4",
        "--eval-split",
        "all",
        "--max-new-tokens",
        "4",
        "--quiet",
        *([] if sweep else ["--no-sweep"]),
        "train_split=all",
        "warmup_steps=1",
        "log_every=2",
        "prefix.projection_dim=16",
        "prefix.num_virtual_tokens=4",
        *extra,
    ]


def _snapshot(path: Path) -> dict[str, bytes]:
    return {str(p.relative_to(path)): p.read_bytes() for p in sorted(path.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def compared(model_dir: Path, data_file: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One comparison of prefix and lora (two worker processes)."""
    out = tmp_path_factory.mktemp("compare") / "cmp"
    assert cli.main(_args(model_dir, data_file, out, "prefix,lora", "lora.r=2")) == 0
    return out


def test_compare_writes_a_report_with_a_row_per_method(compared: Path) -> None:
    for name in ("report.md", "report.html", "results.json", "loss_curves.png", "quality_vs_params.png"):
        assert (compared / name).is_file(), name
    assert (compared / "loss_curves.png").read_bytes()[:4] == b"\x89PNG"
    raw = json.loads((compared / "results.json").read_text())
    runs = {r["method"]: r for r in raw["runs"]}
    assert list(runs) == ["prefix", "lora"] and raw["quality_metric"] == "bleu"
    base = runs["lora"]["base_params"]
    for method in ("prefix", "lora"):
        run = runs[method]
        assert run["steps"] == 4 and run["train_seconds"] > 0 and run["tokens_per_s"] > 0
        assert 0 < run["trainable_params"] < base and 0 < run["saved_params"] <= run["trainable_params"]
        assert run["saved_bytes"] > 0 and run["peak_rss_train_mb"] > run["rss_after_load_mb"] * 0.5 > 0
        assert 0 <= run["scores"]["bleu"] <= 100 and run["scores"]["loss"] > 0
        assert [s for s, _ in run["losses"]] == [2, 4]
        assert not (compared / "runs" / method / "train" / "checkpoint").exists()  # finished: checkpoint gone
    assert runs["lora"]["options"] == {"r": 2} and runs["prefix"]["options"] == {
        "projection_dim": 16,
        "num_virtual_tokens": 4,
    }
    # prefix trains its MLP reparameterization and saves only the collapsed (L, 2, H_kv, P, D) prefix
    assert runs["prefix"]["saved_params"] == 2 * 2 * 2 * 4 * 8 < runs["prefix"]["trainable_params"]
    # each method's default: the prefix's scaled down for the tiny data's ~92 target tokens per step
    # (tests/test_schedule.py checks the value), compare's centre and the rate its run trained at
    centre = json.loads((compared / "compare.json").read_text())["lr_per_method"]["prefix"]
    assert runs["prefix"]["lr"] == centre < 3e-3 and runs["lora"]["lr"] == 2e-4
    md = (compared / "report.md").read_text()
    rows = [line for line in md.splitlines() if line.startswith("| ") and not line.startswith("| method")]
    assert [r.split(" | ")[0].strip("| ") for r in rows if not set(r) <= set("|- ")] == ["prefix", "lora"]
    assert (
        "<table>" in (compared / "report.html").read_text()
        and "data:image/png;base64," in (compared / "report.html").read_text()
    )


def test_a_repeated_command_reuses_finished_runs(model_dir: Path, data_file: Path, compared: Path) -> None:
    results = {p: p.stat().st_mtime_ns for p in compared.glob("runs/*/result.json")}
    logs = {p: p.stat().st_size for p in compared.glob("runs/*/worker.log")}
    assert len(results) == 2
    assert cli.main(_args(model_dir, data_file, compared, "prefix,lora", "lora.r=2")) == 0
    assert {p: p.stat().st_mtime_ns for p in compared.glob("runs/*/result.json")} == results
    assert {p: p.stat().st_size for p in compared.glob("runs/*/worker.log")} == logs  # no worker started


@pytest.mark.parametrize(
    "extra, message",
    [
        (["lora.r=3"], "method_options"),
        (["lora.r=2", "--max-steps", "5"], "max_steps"),
        (["lora.r=2", "--untuned"], "untuned"),
        (["lora.r=2", "--seeds", "0,1"], "seeds"),
        (["lora.r=2", "--bootstrap", "10"], "bootstrap"),
        (["lora.r=2", "--sweep"], "lr_candidates, sweep"),  # the same runs, now swept
    ],
)
def test_another_configuration_is_refused_with_nothing_changed(
    model_dir: Path, data_file: Path, compared: Path, capsys, extra: list[str], message: str
) -> None:
    before = _snapshot(compared)
    capsys.readouterr()
    assert cli.main(_args(model_dir, data_file, compared, "prefix,lora", *extra)) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("prefixtune: error:") and message in err and len(err.splitlines()) == 1, err
    assert _snapshot(compared) == before


def test_an_interrupted_run_resumes_from_its_checkpoint(model_dir: Path, data_file: Path, compared: Path) -> None:
    run = compared / "runs" / "prefix"
    config = TrainConfig(**json.loads((run / "job.json").read_text())["config"])
    (run / "result.json").unlink()
    shutil.rmtree(run / "train")
    config.max_steps = 2  # as if the worker had stopped after step 2 (max_steps may differ on --resume)
    train(config, progress=False)
    assert (run / "train" / "checkpoint").is_dir()
    lora_result = (compared / "runs" / "lora" / "result.json").stat().st_mtime_ns
    assert cli.main(_args(model_dir, data_file, compared, "prefix,lora", "lora.r=2")) == 0
    assert [r["step"] for r in read_metrics(run / "train" / "metrics.jsonl")] == [2, 4]  # continued, not redone
    result = json.loads((run / "result.json").read_text())
    assert result["steps"] == 4 and result["resumed_from_step"] == 2
    assert (compared / "runs" / "lora" / "result.json").stat().st_mtime_ns == lora_result
    # the resumed process saw steps 3-4 only: its RSS high-water mark is not the training's, so no figure
    rows = {
        line.split("|")[1].strip(): line.split("|")
        for line in (compared / "report.md").read_text().splitlines()
        if line.startswith("| prefix") or line.startswith("| lora")
    }
    peak = 11  # the "peak RSS, training" column
    assert rows["prefix"][peak].strip() == "-" and rows["lora"][peak].strip().endswith(")")


@pytest.mark.parametrize(
    "methods, extra, message",
    [
        ("prefix,sgd", [], "unknown method 'sgd'"),
        ("prefix,lora", ["r=8"], "lora.r=8"),  # a LoRA option given to every method, prefix included
        ("prefix", ["lora.r=8"], "not in --methods"),
        ("prefix,lora", ["prefix.bogus=1"], "'bogus' is not an option of method 'prefix'"),
        ("prefix,lora", ["prefix.warmup_steps=3"], "shared"),
        ("prefix,lora", ["seed=3"], "--seeds"),
        ("prefix,lora", ["nonsense=1"], "neither a training setting"),
        ("prefix", ["--train-sizes", "5,x"], "--train-sizes"),
        ("prefix", ["--train-sizes", "500"], "only 6 training examples"),
        ("prefix", ["--train-sizes", "0"], "'0' is not a positive integer"),
        ("prefix", ["--train-sizes", "3,0"], "'0' is not a positive integer"),
        ("prefix", ["--seeds", ""], "--seeds is empty"),
        ("prefix", ["--seeds", " , "], "--seeds is empty"),
        ("prefix", ["--lr-sweep", "1"], "at least 2 rates"),
        ("prefix", ["--lr-sweep", "1,1.0001"], "has one rate"),  # 3 significant digits: the same rate twice
        ("prefix", ["--lr-sweep", "1,0"], "must be a positive number"),
        ("prefix", ["--lrs", "prefix=1e-3"], "at least 2 rates"),
        ("prefix", ["--lrs", "prefix=1e-3,1e-3"], "given twice"),
        ("prefix", ["--lrs", "lora=1e-3,1e-2"], "not in --methods"),
        ("prefix", ["--lrs", "prefix=1e-3,1e-2", "prefix.lr=1e-3"], "give its rates once"),
        ("prefix", ["--sweep-sizes", "5", "--train-sizes", "3"], "not among --train-sizes"),
        ("prefix", ["--no-sweep", "--lr-sweep", "1,3"], "does not combine"),
        ("prefix", ["--bootstrap", "-1"], "--bootstrap"),
        ("prefix", ["--jobs", "0"], "--jobs must be >= 1"),
        ("prefix,full", ["full.top_layers=0"], "top_layers"),
    ],
)
def test_bad_input_is_one_line_exit_2(model_dir, data_file, tmp_path, capsys, methods, extra, message) -> None:
    out = tmp_path / "cmp"
    code = cli.main(_args(model_dir, data_file, out, methods, *extra))
    err = capsys.readouterr().err.strip()
    assert code == 2
    assert err.startswith("prefixtune: error:") and message in err and len(err.splitlines()) == 1, err
    assert not out.exists()


def test_validation_at_train_sizes_needs_a_selection_split(model_dir: Path, tmp_path: Path, capsys) -> None:
    """eval_every at --train-sizes validates on the selection split, not on the runs' eval_split: an empty selection
    split is refused before any run starts (4 distinct inputs leave no validation split), one line, nothing written."""
    data_file = tmp_path / "four.jsonl"
    data_file.write_text("".join(json.dumps({"input": f"name: {n}", "target": f"{n}."}) + "\n" for n in "ABCD"))
    out = tmp_path / "cmp"
    extra = ("--train-sizes", "3", "--eval-split", "all", "eval_every=2", "eval_split=train")
    code = cli.main(_args(model_dir, data_file, out, "prefix", *extra))
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1, err
    assert err.startswith("prefixtune: error:") and "'validation' split" in err and "empty" in err, err
    assert not out.exists()
    extra = ("--train-sizes", "3", "--eval-split", "all")  # the same without validation during training runs
    assert cli.main(_args(model_dir, data_file, out, "prefix", *extra)) == 0


def test_validation_during_training_at_train_sizes_is_the_selection_split(
    model_dir: Path, data_file: Path, tmp_path: Path
) -> None:
    """With --train-sizes, eval_every validates each subsampled run on the comparison's selection split (written to
    DIR/data/validation.jsonl with every reference), never on its own training rows; the best adapter is scored."""
    from prefixtune import data

    out = tmp_path / "cmp"
    extra = ("--train-sizes", "3", "train_split=train", "eval_every=2")
    assert cli.main(_args(model_dir, data_file, out, "prefix", *extra)) == 0
    held_out = data.load_dataset(str(data_file), split="validation")
    rows = [json.loads(line) for line in (out / "data" / "validation.jsonl").read_text().splitlines()]
    assert held_out and rows == [{"input": e.source, "target": r} for e in held_out for r in e.references]
    trained_on = {json.loads(line)["input"] for line in (out / "data" / "train-n3-s0.jsonl").read_text().splitlines()}
    assert trained_on and not trained_on & {e.source for e in held_out}
    run = out / "runs" / "prefix-n3-s0"
    cfg = yaml.safe_load((run / "train" / "config.yaml").read_text())
    assert (cfg["eval_data"], cfg["eval_split"]) == (str(out / "data" / "validation.jsonl"), "all")
    val_losses = [m["val_loss"] for m in read_metrics(run / "train" / "metrics.jsonl") if "val_loss" in m]
    assert len(val_losses) == 2  # steps 2 and 4
    result = json.loads((run / "result.json").read_text())
    assert result["best_val_loss"] == pytest.approx(min(val_losses), abs=1e-4)


def test_the_untuned_model_is_scored_without_training(model_dir: Path, data_file: Path, tmp_path: Path) -> None:
    """The worker's untuned job, run in this process (the subprocess path is the same code)."""
    settings = CompareSettings(["prefix"], model=str(model_dir), data=str(data_file), max_steps=2, batch_size=4)
    settings.eval_split, settings.max_new_tokens, settings.untuned = "all", 4, True
    settings.overrides, settings.sweep = ["train_split=all"], False
    the_plan = plan(settings, tmp_path / "cmp")
    assert the_plan.untuned is not None and not the_plan.sweep_jobs
    assert [j.name for j in the_plan.final_jobs({}, 6)] == ["prefix"]
    record = run_job(write_job(the_plan.untuned, settings))
    assert record["method"] == "untuned" and record["trainable_params"] == record["steps"] == 0
    assert record["peak_rss_mb"] >= record["rss_after_load_mb"] > 0 and 0 <= record["scores"]["bleu"] <= 100
    assert not (tmp_path / "cmp" / "runs" / "untuned" / "train").exists()  # nothing trained, nothing saved


def test_a_worker_error_is_one_line_and_the_run_stays_unfinished(model_dir, data_file, tmp_path, capsys) -> None:
    broken = tmp_path / "broken-model"
    shutil.copytree(model_dir, broken)  # its config and tokenizer read (compare counts tokens with it) ...
    (broken / "model.safetensors").write_bytes(b"not weights")  # ... its weights fail to load in the worker
    out = tmp_path / "cmp"
    assert cli.main(_args(broken, data_file, out, "prefix")) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("prefixtune: error: prefix: cannot load the model") and len(err.splitlines()) == 1, err
    assert (out / "compare.json").is_file() and not (out / "runs" / "prefix" / "result.json").exists()
    assert not (out / "report.md").exists()


def test_jobs_run_together_with_the_results_of_one_at_a_time(model_dir, data_file, tmp_path, capsys, monkeypatch):
    """--jobs 2: the second worker starts before the first is done, and every run trains and scores as it does
    one at a time (both sides with one torch thread per worker: the same arithmetic)."""
    monkeypatch.setenv("OMP_NUM_THREADS", "1")

    def args(out: Path, *extra: str) -> list[str]:
        return [a for a in _args(model_dir, data_file, out, "prefix", "--seeds", "0,1", *extra) if a != "--quiet"]

    assert cli.main(args(tmp_path / "one")) == 0
    capsys.readouterr()
    assert cli.main(args(tmp_path / "two", "--jobs", "2")) == 0
    err = capsys.readouterr().err.splitlines()
    started = [i for i, line in enumerate(err) if "in a new process" in line]
    done = [i for i, line in enumerate(err) if ": done in " in line]
    assert len(started) == len(done) == 2 and started[1] < done[0], err
    one, two = (json.loads((tmp_path / d / "results.json").read_text())["runs"] for d in ("one", "two"))
    assert [r["name"] for r in one] == [r["name"] for r in two] == ["prefix-nall-s0", "prefix-nall-s1"]
    for a, b in zip(one, two):
        assert (a["losses"], a["scores"], a["example_stats"]) == (b["losses"], b["scores"], b["example_stats"])
        assert (a["jobs"], b["jobs"]) == (1, 2)
    assert one[0]["losses"] != one[1]["losses"]  # two seeds: two different runs, not one result twice
    assert "one at a time" in (tmp_path / "one" / "report.md").read_text()
    assert "up to 2 at a time (`--jobs 2`" in (tmp_path / "two" / "report.md").read_text()
    assert cli.main(args(tmp_path / "two")) == 0  # a resume with another --jobs: the same comparison, reused
    assert "finished earlier, reusing" in capsys.readouterr().err


def test_with_jobs_a_failure_stops_the_comparison_in_one_line(model_dir, data_file, tmp_path, capsys) -> None:
    broken = tmp_path / "broken-model"
    shutil.copytree(model_dir, broken)
    (broken / "model.safetensors").write_bytes(b"not weights")
    out = tmp_path / "cmp"
    assert cli.main(_args(broken, data_file, out, "prefix,lora", "--jobs", "2")) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("prefixtune: error: prefix: cannot load the model") and len(err.splitlines()) == 1, err
    assert not list(out.glob("runs/*/result.json")) and not (out / "report.md").exists()


def test_each_worker_gets_its_share_of_the_cores(monkeypatch) -> None:
    from prefixtune.compare.process import worker_env

    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    cores = len(os.sched_getaffinity(0))
    assert worker_env(1) is None  # one at a time: torch's own default
    assert worker_env(2)["OMP_NUM_THREADS"] == str(max(1, cores // 2))
    assert worker_env(4 * cores)["OMP_NUM_THREADS"] == "1"
    monkeypatch.setenv("OMP_NUM_THREADS", "3")
    assert worker_env(2) is None  # the user's own setting is kept


def test_a_directory_that_is_not_a_comparison_is_refused(model_dir, data_file, tmp_path, capsys) -> None:
    out = tmp_path / "busy"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    assert cli.main(_args(model_dir, data_file, out, "prefix")) == 2
    assert "not a compare directory" in capsys.readouterr().err
    assert _snapshot(out) == {"notes.txt": b"mine"}


def test_options_are_routed_per_method() -> None:
    common, options, rates = route_overrides(
        ["prefix", "lora", "lora+prefix"],
        ["warmup_steps=5", "prefix.num_virtual_tokens=8", "lora.r=8", "lora+prefix.lora.r=4", "prefix.lr=5e-3"],
    )
    assert common == {"warmup_steps": "5"} and rates == {"prefix": "5e-3"}
    assert options == {"prefix": {"num_virtual_tokens": "8"}, "lora": {"r": "8"}, "lora+prefix": {"lora.r": "4"}}
    _, options, _ = route_overrides(["prefix", "prompt"], ["num_virtual_tokens=6"])  # both take it: both get it
    assert options == {"prefix": {"num_virtual_tokens": "6"}, "prompt": {"num_virtual_tokens": "6"}}
    with pytest.raises(PrefixTuneError, match="does not apply to prefix"):
        route_overrides(["prefix", "lora"], ["r=8"])
    with pytest.raises(PrefixTuneError, match=r"not in --methods \(lora\+prefix\); .* lora\+prefix.lora.r=8"):
        route_overrides(["lora+prefix"], ["lora.r=8"])


def _fake_run(method: str, size: int, seed: int, accuracy: float) -> dict:
    return {
        "name": f"{method}-n{size}-s{seed}",
        "method": method,
        "train_size": size,
        "train_examples": size,
        "seed": seed,
        "lr": 1e-3,
        "base_params": 1000,
        "rss_after_load_mb": 100.0,
        "peak_rss_train_mb": 150.0,
        "trainable_params": 10 if method == "prefix" else 1000,
        "saved_params": 2 if method == "prefix" else 1000,
        "saved_bytes": 64,
        "steps": 3,
        "train_seconds": 1.0,
        "tokens_per_s": 50.0,
        "losses": [[1, 2.0], [2, 1.5], [3, 1.2]],
        "scores": {"examples": 4.0, "accuracy": accuracy},
    }


def test_low_data_report_has_a_table_and_plot_per_size(tmp_path: Path) -> None:
    runs = [
        _fake_run(m, n, s, 0.5 + n / 1000 + s / 100 + (0.1 if m == "prefix" else 0))
        for m in ("prefix", "full")
        for n in (50, 100)
        for s in (0, 1)
    ]
    untuned = {**_fake_run("untuned", 0, 0, 0.4), "train_size": None, "trainable_params": 0, "saved_params": 0}
    runs.insert(0, {**untuned, "steps": 0, "lr": None, "losses": [], "tokens_per_s": None})
    settings = {"methods": ["prefix", "full"], "model": "m", "data": "d", "max_steps": 3, "batch_size": 2}
    settings.update(seeds=[0, 1], eval_split="test", eval_limit=None)
    raw = report.write_report(tmp_path, settings, runs)
    assert raw["quality_metric"] == "accuracy" and "quality_vs_train_size.png" in raw["files"]
    md = (tmp_path / "report.md").read_text()
    assert "accuracy @ 50" in md and "accuracy @ 100" in md and "± " in md and "| untuned | - | - | - | 0 |" in md
    # no sweep is not "the default rate": a given METHOD.lr trains too, so the text points at the lr column
    assert "one learning rate each (column lr" in md and "default learning rate" not in md
    report.write_report(tmp_path, {**settings, "sweep": True}, runs)
    assert "its own swept learning rate" in (tmp_path / "report.md").read_text()
    header, rows = report.size_table(runs)
    assert rows[0][0] == "prefix" and rows[0][1] == "65.50 ± 0.71"
    assert (tmp_path / "quality_vs_train_size.png").read_bytes()[:4] == b"\x89PNG"


def test_train_top_layers_flag_is_the_full_method_option(model_dir: Path, data_file: Path, tmp_path: Path) -> None:
    out = tmp_path / "ft-top1"
    args = ["train", "--model", str(model_dir), "--data", str(data_file), "--out", str(out), "--method", "full"]
    args += ["--top-layers", "1", "--max-steps", "1", "--batch-size", "4", "--quiet", "train_split=all"]
    assert cli.main(args) == 0
    assert yaml.safe_load((out / "config.yaml").read_text())["options"] == {"top_layers": 1}
    assert json.loads((out / "full_finetune.json").read_text())["full"]["top_layers"] == 1


def test_a_diverging_run_is_listed_in_the_report(model_dir: Path, data_file: Path, tmp_path: Path) -> None:
    """Full fine-tuning of the tiny model at lr 0.3 climbs from 5.75 to 9.4 by step 4 (tests/test_schedule.py):
    the worker keeps the trainer's warning in result.json and the report lists it under the run's name."""
    settings = CompareSettings(["full"], model=str(model_dir), data=str(data_file), max_steps=12, batch_size=4)
    settings.eval_split, settings.max_new_tokens, settings.sweep = "all", 4, False
    settings.overrides = ["train_split=all", "warmup_steps=0", "log_every=1", "full.lr=0.3"]
    out = tmp_path / "cmp"
    (job,) = plan(settings, out).final_jobs({}, 6)
    record = run_job(write_job(job, settings))
    assert len(record["warnings"]) == 1 and "training is diverging" in record["warnings"][0][1]
    step = record["warnings"][0][0]
    calm = {**record, "name": "calm", "warnings": []}
    summary = {"methods": ["full"], "model": "m", "data": "d", "max_steps": 12, "batch_size": 4, "seeds": [0]}
    report.write_report(out, {**summary, "eval_split": "all", "eval_limit": None}, [record, calm], [record])
    md = (out / "report.md").read_text()
    assert "## Training warnings" in md and md.count(f"| {record['name']} | {step} | training loss") == 1
    assert "| calm |" not in md.split("## Training warnings")[1]
    report.write_report(out, {**summary, "eval_split": "all", "eval_limit": None}, [calm])
    assert "Training warnings" not in (out / "report.md").read_text()
