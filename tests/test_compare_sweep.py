"""`prefixtune compare`'s learning-rate sweep, seeds, train subsamples and bootstrap intervals, on a tiny model.

The comparison runs its cells in this process (`run_compare(launch=worker.run_job)`): the same plan, worker code
and files as the one-process-per-run path that tests/test_compare.py runs, without a new interpreter per run.
"""

from __future__ import annotations

import json
import random
import statistics
from pathlib import Path

import pytest

from prefixtune import cli
from prefixtune.compare import CompareSettings, plan, report, run_compare, sweep
from prefixtune.compare import run as compare_run
from prefixtune.compare.intervals import group_name
from prefixtune.compare.worker import run_job
from prefixtune.errors import PrefixTuneError
from prefixtune.eval import metrics

LOW, HIGH = 1e-6, 3e-2  # for a tiny random model and 6 steps: the first barely moves, the second learns


class Launches:
    """Runs each job in this process and counts them."""

    def __init__(self) -> None:
        self.jobs: list[str] = []

    def __call__(self, job_path: Path) -> None:
        self.jobs.append(job_path.parent.name + "/" + job_path.name)
        run_job(job_path)


def _settings(model_dir: Path, data_file: Path, **changes) -> CompareSettings:
    settings = CompareSettings(
        ["prefix"],
        model=str(model_dir),
        data=str(data_file),
        max_steps=6,
        batch_size=4,
        seeds=[0, 1],
        eval_split="test",
        max_new_tokens=4,
        lr_lists={"prefix": [LOW, HIGH]},
        bootstrap=200,
        sweep_extend=0,  # the grid only; test_a_winner_at_the_edge_tries_one_rate_beyond_it extends it
        overrides=["warmup_steps=1", "log_every=3", "prefix.projection_dim=16", "prefix.num_virtual_tokens=4"],
    )
    for key, value in changes.items():
        setattr(settings, key, value)
    return settings


@pytest.fixture(scope="module")
def swept(model_dir: Path, data_file: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict, Launches]:
    out = tmp_path_factory.mktemp("sweep") / "cmp"
    launches = Launches()
    raw = run_compare(_settings(model_dir, data_file), out, progress=False, launch=launches)
    return out, raw, launches


def test_the_sweep_picks_the_best_validation_score_and_only_the_winner_is_tested(swept) -> None:
    out, raw, launches = swept
    tried = {r["lr"]: r for r in raw["sweep"]}
    assert sorted(tried) == [LOW, HIGH] and all(r["seed"] == 0 for r in tried.values())
    for record in tried.values():  # scored on the validation split only
        assert "select_scores" in record and "scores" not in record and record["select_scores"]["examples"] == 1
    winner = sweep.choose(list(tried.values()), "bleu")
    assert [r["lr"] for r in tried.values() if r.get("won")] == [winner["lr"]]
    # the known case: the higher rate lowers the validation loss (the tie-break when BLEU is level)
    assert tried[HIGH]["select_scores"]["loss"] < tried[LOW]["select_scores"]["loss"]
    assert winner["lr"] == HIGH
    assert raw["chosen_lr"] == [{"method": "prefix", "train_size": None, "lr": HIGH, "swept_here": True}]
    # every seed trains at the winning rate and is tested; the losing rate never sees the test split
    assert [(r["seed"], r["lr"]) for r in raw["runs"]] == [(0, HIGH), (1, HIGH)]
    assert all(r["scores"]["examples"] == 1 and "bleu" in r["scores"] for r in raw["runs"])
    loser, won = out / "runs" / f"prefix-nall-s0-lr{LOW:g}", out / "runs" / f"prefix-nall-s0-lr{HIGH:g}"
    assert (loser / "predictions-validation.jsonl").is_file() and (won / "predictions-validation.jsonl").is_file()
    assert not (loser / "test_result.json").exists() and not (loser / "predictions-test.jsonl").exists()
    assert (won / "test_result.json").is_file() and (won / "predictions-test.jsonl").is_file()
    assert launches.jobs == [
        f"prefix-nall-s0-lr{LOW:g}/job.json",
        f"prefix-nall-s0-lr{HIGH:g}/job.json",
        f"prefix-nall-s0-lr{HIGH:g}/test_job.json",  # the winner of seed 0 is not retrained, only tested
        f"prefix-nall-s1-lr{HIGH:g}/job.json",
    ]
    md = (out / "report.md").read_text()
    assert "Learning-rate sweep" in md and f"{HIGH:g}: " in md and "*" in md and "first seed only" in md


def test_seeds_are_distinct_runs_and_the_report_gives_their_mean_and_sd(swept) -> None:
    out, raw, _ = swept
    first, second = raw["runs"]
    assert first["losses"] != second["losses"]  # another seed: another initialization and data order
    losses = [first["scores"]["loss"], second["scores"]["loss"]]
    header, rows = report.main_table(raw["runs"], raw["intervals"], raw["sweep"])
    cell = rows[0][header.index("test loss")]
    assert cell == f"{statistics.mean(losses):.2f} ± {statistics.stdev(losses):.2f}" and rows[0][2] == "2"
    assert f"| {cell} |" in (out / "report.md").read_text()
    (row,) = raw["summary"]
    assert row["seeds"] == [0, 1] and row["lr"] == HIGH
    assert row["scores"]["loss"] == {
        "mean": round(statistics.mean(losses), 4),
        "sd": round(statistics.stdev(losses), 4),
    }
    assert row["interval_95"]["metric"] == "bleu" and row["interval_95"]["low"] <= row["interval_95"]["high"]


def test_the_interval_is_the_bootstrap_of_the_runs_statistics(swept) -> None:
    _, raw, _ = swept
    tables = [r["example_stats"]["bleu"] for r in raw["runs"]]
    assert all(len(t) == 1 for t in tables)  # one test input, one row of sufficient statistics per seed
    expected = metrics.bootstrap_interval("bleu", tables, resamples=200, seed=0)
    point, low, high = raw["intervals"][group_name(raw["runs"][0])]
    assert [point, low, high] == [round(v, 4) for v in expected]
    assert point == pytest.approx(statistics.mean(r["scores"]["bleu"] for r in raw["runs"]), abs=1e-3)


def test_a_rerun_skips_finished_runs_and_runs_only_a_missing_one(model_dir, data_file, swept) -> None:
    out, raw, _ = swept
    again = Launches()
    assert run_compare(_settings(model_dir, data_file), out, progress=False, launch=again)["runs"] == raw["runs"]
    assert again.jobs == []
    (out / "runs" / f"prefix-nall-s1-lr{HIGH:g}" / "result.json").unlink()
    assert run_compare(_settings(model_dir, data_file), out, progress=False, launch=again)["sweep"] == raw["sweep"]
    assert again.jobs == [f"prefix-nall-s1-lr{HIGH:g}/job.json"]


def test_another_sweep_on_the_directory_is_refused_with_nothing_changed(model_dir, data_file, swept) -> None:
    out, _, _ = swept
    before = {str(p): p.read_bytes() for p in sorted(out.rglob("*")) if p.is_file()}
    launches = Launches()
    with pytest.raises(PrefixTuneError, match="lr_candidates, lr_lists differ"):
        run_compare(_settings(model_dir, data_file, lr_lists={"prefix": [LOW, 1e-2]}), out, launch=launches)
    assert launches.jobs == [] and before == {str(p): p.read_bytes() for p in sorted(out.rglob("*")) if p.is_file()}


def test_sizes_train_on_one_seeded_nested_subsample_per_seed(model_dir, data_file, tmp_path) -> None:
    settings = _settings(model_dir, data_file, methods=["prefix", "lora"], train_sizes=[2, 3], lr_lists={})
    settings.overrides.append("train_split=all")
    settings.sweep_sizes = [2]
    the_plan = plan(settings, tmp_path)
    # the sweep: 3 rates around each method's default, first seed, the swept size only; the prefix's centre is
    # its default scaled to this data's few target tokens per step (tests/test_schedule.py checks the value)
    centre = the_plan.sweep_jobs[1].config.lr
    assert centre < 3e-3
    assert [(j.method, j.train_size, j.seed, j.config.lr) for j in the_plan.sweep_jobs] == [
        ("prefix", 2, 0, sweep.rounded(centre / 3)),
        ("prefix", 2, 0, centre),
        ("prefix", 2, 0, sweep.rounded(centre * 3)),
        ("lora", 2, 0, 6.67e-5),
        ("lora", 2, 0, 2e-4),
        ("lora", 2, 0, 6e-4),
    ]
    high = sweep.rounded(centre * 3)
    finals = the_plan.final_jobs({("prefix", 2): high, ("lora", 2): 2e-4}, 6)
    assert {(j.method, j.train_size, j.config.lr) for j in finals} == {
        (m, n, lr)
        for m, lr in (("prefix", high), ("lora", 2e-4))
        for n in (2, 3)  # size 3 reuses size 2's winner
    }
    assert {j.config.data for j in finals if j.seed == 1 and j.train_size == 3} == {
        str(tmp_path / "data" / "train-n3-s1.jsonl")  # the same file for every method of that seed and size
    }
    compare_run.write_subsamples(the_plan)
    read = {
        (n, s): [json.loads(line) for line in (tmp_path / "data" / f"train-n{n}-s{s}.jsonl").read_text().splitlines()]
        for n in (2, 3)
        for s in (0, 1)
    }
    assert all(len(rows) == n for (n, _), rows in read.items())
    for seed in (0, 1):
        assert all(row in read[(3, seed)] for row in read[(2, seed)])  # nested: the 2 are among the 3
    assert read[(3, 0)] != read[(3, 1)]  # another seed, another subsample


def test_the_sweep_sizes_reuse_the_nearest_winner() -> None:
    assert sweep.source_size(100, [50, 500], 700) == 50  # log distance: 100 is nearer 50 than 500
    assert sweep.source_size(200, [50, 500], 700) == 500
    assert sweep.source_size(None, [50, 500], 700) == 500 and sweep.source_size(50, [50, 500], 700) == 50


def test_choose_is_the_argmax_of_the_validation_scores_then_the_lowest_loss() -> None:
    records = [
        {"lr": 1e-3, "rate_index": 0, "select_scores": {"bleu": 10.0, "loss": 1.0}},
        {"lr": 3e-3, "rate_index": 1, "select_scores": {"bleu": 12.0, "loss": 2.0}},
        {"lr": 9e-3, "rate_index": 2, "select_scores": {"bleu": 12.0, "loss": 1.5}},
    ]
    assert sweep.choose(records, "bleu")["lr"] == 9e-3
    assert sweep.choose(records[:2], "bleu")["lr"] == 3e-3


def _texts(seed: int, n: int) -> tuple[list[str], list[list[str]]]:
    rng = random.Random(seed)
    words = "the blue spice pub is near the river and serves cheap coffee in the city centre".split()
    preds = [" ".join(rng.choice(words) for _ in range(rng.randint(4, 12))) for _ in range(n)]
    refs = [[" ".join(rng.choice(words) for _ in range(rng.randint(4, 12))) for _ in range(3)] for _ in range(n)]
    return preds, refs


def test_per_example_statistics_give_the_corpus_scores_back() -> None:
    preds, refs = _texts(0, 30)
    refs[3] = refs[3][:1]  # examples may have different numbers of references
    bleu_rows = metrics.example_statistics("bleu", preds, refs)
    assert metrics.score_from_statistics("bleu", [sum(c) for c in zip(*bleu_rows)]) == pytest.approx(
        metrics.bleu(preds, refs), abs=1e-9
    )
    rouge_rows = metrics.example_statistics("rougeL", preds, refs)
    assert metrics.score_from_statistics("rougeL", [sum(c) for c in zip(*rouge_rows)]) == pytest.approx(
        metrics.rouge(preds, refs)["rougeL"], abs=1e-9
    )
    labels = ["positive", "negative", "positive"]
    rows = metrics.example_statistics("accuracy", ["Positive.", "positive", "positive"], [[x] for x in labels])
    assert metrics.score_from_statistics("accuracy", [sum(c) for c in zip(*rows)]) == pytest.approx(2 / 3)


def test_the_bootstrap_contains_its_point_and_is_deterministic_for_its_seed() -> None:
    runs = [metrics.example_statistics("bleu", *_texts(s, 40)[:1], _texts(s, 40)[1]) for s in (1, 2)]
    point, low, high = metrics.bootstrap_interval("bleu", runs, resamples=300, seed=7)
    assert low < point < high
    singles = [metrics.score_from_statistics("bleu", [sum(c) for c in zip(*r)]) for r in runs]
    assert point == pytest.approx(statistics.mean(singles))  # the mean over runs
    assert metrics.bootstrap_interval("bleu", runs, resamples=300, seed=7) == (point, low, high)
    assert metrics.bootstrap_interval("bleu", runs, resamples=300, seed=8) != (point, low, high)
    with pytest.raises(PrefixTuneError, match="same, non-empty inputs"):
        metrics.bootstrap_interval("bleu", [runs[0], runs[1][:-1]])


def test_the_cli_refuses_a_one_rate_sweep_before_anything_is_written(model_dir, data_file, tmp_path, capsys) -> None:
    out = tmp_path / "cmp"
    args = ["compare", "--methods", "prefix", "--model", str(model_dir), "--data", str(data_file), "--out", str(out)]
    assert cli.main([*args, "--lrs", "prefix=1e-3"]) == 2
    err = capsys.readouterr().err.strip()
    assert "at least 2 rates" in err and "--no-sweep" in err and len(err.splitlines()) == 1 and not out.exists()


def test_the_untuned_row_of_a_swept_report_shows_no_rate(swept) -> None:
    _, raw, _ = swept
    untuned = {**raw["runs"][0], "method": "untuned", "lr": None, "steps": 0, "trainable_params": 0}
    header, rows = report.main_table([untuned, *raw["runs"]], raw["intervals"], raw["sweep"])
    column = header.index("validation bleu per rate tried (* won)")
    assert rows[0][0] == "untuned" and rows[0][column] == "-" and rows[1][column].endswith("*")


def test_beyond_edge_is_one_grid_step_past_an_end_winner() -> None:
    assert sweep.beyond_edge([1e-3, 3e-3, 9e-3], 9e-3) == 2.7e-2
    assert sweep.beyond_edge([1e-3, 3e-3, 9e-3], 1e-3) == 3.33e-4
    assert sweep.beyond_edge([1e-3, 3e-3, 9e-3], 3e-3) is None  # an inner winner: the grid holds the best
    assert sweep.beyond_edge([9e-3, 1e-3, 3e-3, 2.7e-2], 2.7e-2) == 8.1e-2  # the order tried does not matter
    assert sweep.beyond_edge([3e-3], 3e-3) is None


def test_a_winner_at_the_edge_tries_one_rate_beyond_it(model_dir, data_file, tmp_path) -> None:
    grid = [3e-3, HIGH]  # for 6 steps of a tiny model the higher rate wins (as with LOW, HIGH above)
    settings = _settings(model_dir, data_file, lr_lists={"prefix": grid}, sweep_extend=1, seeds=[0])
    launches = Launches()
    raw = run_compare(settings, tmp_path / "cmp", progress=False, launch=launches)
    tried = {r["lr"]: r for r in raw["sweep"]}
    beyond = sweep.rounded(HIGH * HIGH / 3e-3)
    assert sorted(tried) == [3e-3, HIGH, beyond]  # one step past the winning edge, and no more (sweep_extend=1)
    assert [lr for lr, r in tried.items() if r.get("beyond_grid")] == [beyond]
    winner = sweep.choose(list(tried.values()), "bleu")
    assert [lr for lr, r in tried.items() if r.get("won")] == [winner["lr"]] == [raw["runs"][0]["lr"]]
    assert launches.jobs[2] == f"prefix-nall-s0-lr{beyond:g}/job.json"
    md = (tmp_path / "cmp" / "report.md").read_text()
    assert "(beyond grid)" in md and "one more rate beyond it" in md
    again = Launches()  # a rerun reuses every run, the one beyond the grid too
    assert run_compare(settings, tmp_path / "cmp", progress=False, launch=again)["sweep"] == raw["sweep"]
    assert again.jobs == []


def test_a_directory_from_before_sweep_extend_resumes_with_the_fixed_grid(model_dir, data_file, swept) -> None:
    out, raw, _ = swept
    saved = json.loads((out / "compare.json").read_text())
    legacy = {k: v for k, v in saved.items() if k != "sweep_extend"}
    (out / "compare.json").write_text(json.dumps(legacy))
    try:
        again = Launches()
        assert run_compare(_settings(model_dir, data_file), out, progress=False, launch=again)["sweep"] == raw["sweep"]
        assert again.jobs == []  # resumed as it ran: nothing trained again, no rate beyond the grid
        with pytest.raises(PrefixTuneError, match="sweep_extend differ"):
            run_compare(_settings(model_dir, data_file, sweep_extend=1), out, progress=False, launch=again)
    finally:
        (out / "compare.json").write_text(json.dumps(saved, indent=2) + "\n")


def test_the_cli_refuses_a_negative_sweep_extend_or_one_without_a_sweep(model_dir, data_file, tmp_path, capsys):
    out = tmp_path / "cmp"
    args = ["compare", "--methods", "prefix", "--model", str(model_dir), "--data", str(data_file), "--out", str(out)]
    for bad, says in ((["--sweep-extend", "-1"], ">= 0"), (["--no-sweep", "--sweep-extend", "1"], "--sweep-extend")):
        assert cli.main([*args, *bad]) == 2
        err = capsys.readouterr().err.strip()
        assert says in err and len(err.splitlines()) == 1 and not out.exists()


def test_the_metric_picks_the_winner_where_bleu_and_rouge_disagree() -> None:
    records = [
        {"lr": 1e-3, "rate_index": 0, "select_scores": {"bleu": 12.0, "rougeL": 30.0, "loss": 1.0}},
        {"lr": 3e-3, "rate_index": 1, "select_scores": {"bleu": 10.0, "rougeL": 35.0, "loss": 1.0}},
    ]
    assert sweep.choose(records, report.quality_key(records, "select_scores"))["lr"] == 1e-3  # bleu by default
    assert sweep.choose(records, report.quality_key(records, "select_scores", "rougeL"))["lr"] == 3e-3
    labelled = [{"select_scores": {"accuracy": 0.5, "loss": 1.0}}]
    assert report.quality_key(labelled, "select_scores", "rougeL") == "accuracy"  # classification stays accuracy


def test_a_rouge_comparison_reports_and_bootstraps_rouge(model_dir, data_file, tmp_path) -> None:
    settings = _settings(model_dir, data_file, seeds=[0], metric="rougeL")
    raw = run_compare(settings, tmp_path / "cmp", progress=False, launch=Launches())
    assert raw["quality_metric"] == "rougeL" and raw["settings"]["metric"] == "rougeL"
    tried = [r for r in raw["sweep"]]
    assert [r["lr"] for r in tried if r.get("won")] == [sweep.choose(tried, "rougeL")["lr"]] == [raw["runs"][0]["lr"]]
    tables = [r["example_stats"]["rougeL"] for r in raw["runs"]]
    expected = metrics.bootstrap_interval("rougeL", tables, resamples=200, seed=0)
    assert raw["intervals"][group_name(raw["runs"][0])] == [round(v, 4) for v in expected]
    assert raw["summary"][0]["interval_95"]["metric"] == "rougeL"
    md = (tmp_path / "cmp" / "report.md").read_text()
    assert "ROUGE-L 95% interval (test inputs)" in md and "validation rougeL per rate tried" in md
    assert "the quality metric is ROUGE-L" in md
    before = {str(p): p.read_bytes() for p in sorted((tmp_path / "cmp").rglob("*")) if p.is_file()}
    with pytest.raises(PrefixTuneError, match="metric differ"):  # another metric would pick other winners
        run_compare(_settings(model_dir, data_file, seeds=[0]), tmp_path / "cmp", launch=Launches())
    assert before == {str(p): p.read_bytes() for p in sorted((tmp_path / "cmp").rglob("*")) if p.is_file()}


def test_the_cli_refuses_a_generation_metric_for_classification(model_dir, tmp_path, capsys) -> None:
    labelled = tmp_path / "labels.jsonl"
    rows = [{"input": f"review {i}", "label": ("good", "bad")[i % 2]} for i in range(12)]
    labelled.write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = tmp_path / "cmp"
    args = ["compare", "--methods", "prefix", "--model", str(model_dir), "--data", str(labelled), "--out", str(out)]
    assert cli.main([*args, "--metric", "rougeL", "--no-sweep"]) == 2
    err = capsys.readouterr().err.strip()
    assert "classification, scored by accuracy" in err and len(err.splitlines()) == 1 and not out.exists()
