"""Checkpoint scoring: recall of signature tags against collapse, the recommendation, the CLI."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.training.train_helpers import paint
from training.data.checkpoints import (
    CheckpointScore, combined_score, pixel_collapse, recommend, signature_recall, tag_collapse,
)

SIGNATURE = ["long hair", "red theme"]


def _score(step: int, tag_sets: list[dict[str, float]]) -> CheckpointScore:
    recall = signature_recall(tag_sets, SIGNATURE)
    collapse = tag_collapse(tag_sets, SIGNATURE + ["hkr"])
    return CheckpointScore(step, recall, collapse, combined_score(recall, collapse), len(tag_sets))


def test_recommends_learned_but_not_collapsed():
    # Early: follows the prompts but has not learned the subject.
    early = [{"1girl": 0.9, "beach": 0.8}, {"1girl": 0.9, "forest": 0.7}, {"1girl": 0.8, "city": 0.9}]
    # Middle: learned the subject (signature tags) and still follows the prompts.
    middle = [{"long_hair": 0.9, "red_theme": 0.8, "beach": 0.8}, {"long hair": 0.8, "red theme": 0.9, "forest": 0.7},
              {"long hair": 0.9, "red theme": 0.7, "city": 0.8, "1girl": 0.9}]
    # Late: overfit; every prompt gives the same picture.
    late = [{"long hair": 0.9, "red theme": 0.9, "1girl": 0.9, "sitting": 0.8}] * 3
    scores = [_score(100, early), _score(200, middle), _score(300, late)]
    assert scores[1].recall == 1.0 and scores[2].recall == 1.0 and scores[0].recall == 0.0
    assert scores[2].collapse > 0.99 and scores[1].collapse < 0.5
    assert recommend(scores).step == 200


def test_ties_go_to_the_earlier_checkpoint():
    scores = [CheckpointScore(400, 0.9, 0.3, 0.9, 4), CheckpointScore(200, 0.89, 0.3, 0.89, 4), CheckpointScore(600, 0.5, 0.3, 0.5, 4)]
    assert recommend(scores).step == 200


def test_pixel_collapse_measures_sameness():
    same = [paint((200, 50, 50), seed=1, size=64)] * 3
    varied = [paint((200, 50, 50), seed=s, size=64) for s in (1, 2, 3)]
    assert pixel_collapse(same) == pytest.approx(1.0)
    assert pixel_collapse(varied) < 0.5


@pytest.fixture()
def scored_run(tmp_path) -> Path:
    """A run dir whose checkpoints hold painted samples: blue (nothing learned), then red."""
    from training.data.run_record import checkpoint_dir, update_run

    run_dir = tmp_path / "run"
    for step, rgb in ((100, (30, 40, 210)), (200, (220, 40, 40)), (300, (230, 30, 30))):
        folder = checkpoint_dir(run_dir, step)
        (folder / "samples").mkdir(parents=True)
        (folder / "adapter.safetensors").write_bytes(b"not needed for scoring")
        for i in range(3):
            paint(rgb, seed=i, size=64).save(folder / "samples" / f"{i:02d}.png")
    update_run(run_dir, status="completed", trigger="hkr", signature_tags=SIGNATURE)
    return run_dir


def test_cli_scores_with_the_wd_tagger_and_records_the_choice(scored_run, tmp_path, capsys):
    from training.cli import main
    from tests.training.tiny_tagger import make_tiny_tagger

    tagger = make_tiny_tagger(tmp_path / "tagger")
    assert main(["checkpoints", str(scored_run), "--tagger", str(tagger)]) == 0
    out = capsys.readouterr().out
    record = json.loads((scored_run / "run.json").read_text())
    by_step = {s["step"]: s for s in record["scores"]}
    assert by_step[100]["recall"] == 0.0 and by_step[200]["recall"] == 1.0
    assert record["recommended_checkpoint"] == 200  # as good as 300, and earlier
    assert " *     200" in out and "recommended: step 200; chosen: none" in out

    assert main(["checkpoints", str(scored_run), "--choose", "300"]) == 0
    assert json.loads((scored_run / "run.json").read_text())["chosen_checkpoint"] == 300
    assert ">      300" in capsys.readouterr().out
    assert main(["checkpoints", str(scored_run), "--choose", "150"]) == 2
    assert "no checkpoint at step 150; checkpoints: [100, 200, 300]" in capsys.readouterr().err
