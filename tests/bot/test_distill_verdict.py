"""What an admin reads when a distillation ends: the judge's numbers and why it is (not) recommended."""

from __future__ import annotations

from bot.distill_flow import verdict
from bot.training_store import RunRow


def _run(report: dict, recommended: bool) -> RunRow:
    return RunRow(run_id="distill-x", adapter_name="ink-fast", kind="distill", status="completed",
                  options={"student_steps": 4, "mix": [["ink", 0.8]]}, created_by=1, attempt=1, progress_step=20,
                  progress_total=20, result={"report": report, "recommended": recommended, "mix": [["ink", 0.8]]},
                  error=None, channel_id=None, guild_id=None, trigger="", dataset="ink", run_dir="", loss=0.1,
                  last_seq=0, recommended_step=None, chosen_step=None, promoted_as=None, created_at=0.0,
                  started_at=None, finished_at=None)


def test_a_run_closer_than_before_but_not_than_the_stock_adapter_says_so() -> None:
    text = str(verdict(_run({"distance_before": 0.4, "distance_after": 0.3, "distance_stock": 0.25,
                             "distill_gain": 0.75}, recommended=False)))
    assert "before 0.4, stock adapter 0.25, after 0.3" in text
    assert "not closer than the stock adapter" in text
    assert "no closer to the teacher than before" not in text


def test_a_run_no_closer_than_before_and_a_recommended_one() -> None:
    worse = str(verdict(_run({"distance_before": 0.3, "distance_after": 0.31, "distill_gain": 1.03}, False)))
    assert "no closer to the teacher than before" in worse and "stock adapter —" in worse
    better = str(verdict(_run({"distance_before": 0.4, "distance_after": 0.2, "distance_stock": 0.3,
                               "distill_gain": 0.5}, True)))
    assert "closer than before and than the stock adapter" in better
