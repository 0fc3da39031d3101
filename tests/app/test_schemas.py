"""Request validation that needs no model: one clear message naming the field."""

from __future__ import annotations

import pytest
from pydantic import TypeAdapter, ValidationError

from app.schemas import AblateJob, AttributeJob, CchgJob, ChgJob, JobRequest, ScoreJob, TraceJob

requests: TypeAdapter = TypeAdapter(JobRequest)


def errors_of(body: dict) -> str:
    with pytest.raises(ValidationError) as info:
        requests.validate_python({"model": "m", **body})
    return str(info.value)


def test_discriminated_union_picks_the_kind() -> None:
    assert isinstance(
        requests.validate_python({"kind": "score", "model": "m", "texts": "a"}), ScoreJob
    )
    job = requests.validate_python({"kind": "trace", "model": "m", "texts": ["a", "b"]})
    assert isinstance(job, TraceJob) and job.text_list() == ["a", "b"]


@pytest.mark.parametrize(
    ("body", "needle"),
    [
        ({"kind": "nope"}, "kind"),
        ({"kind": "score", "texts": "a", "extra": 1}, "extra"),
        ({"kind": "score", "texts": ""}, "texts"),
        ({"kind": "score", "texts": "a", "temperature": -1}, "temperature"),
        ({"kind": "trace", "texts": "a", "sites": ["bogus"]}, "bogus"),
        ({"kind": "trace", "texts": "a", "positions": []}, "at least one position"),
        ({"kind": "score", "texts": "a", "temperature": float("inf")}, "finite number"),
        ({"kind": "chg", "texts": ["a"], "targets": ["b"], "lr": float("inf")}, "lr"),
        ({"kind": "chg", "texts": ["a"], "targets": ["b"], "l1_weight": float("nan")}, "l1_weight"),
        ({"kind": "chg", "texts": ["a", "b"], "targets": ["x"]}, "targets"),
        ({"kind": "chg", "texts": ["a"], "targets": [""]}, "targets"),
        ({"kind": "chg", "texts": ["a"], "targets": ["b"], "num_masks": -1}, "num_masks"),
        ({"kind": "chg"}, "exactly one"),
        ({"kind": "ablate", "texts": ["a"], "targets": ["b"]}, "head_mask"),
        ({"kind": "ablate", "texts": ["a"], "targets": ["b"], "head_mask": [[2.0]]}, "[0, 1]"),
        ({"kind": "ablate", "texts": ["a"], "targets": ["b"], "from_job": "x"}, "keep"),
        (
            {"kind": "cchg", "retain_texts": ["a"], "retain_targets": ["b"],
             "forget_texts": ["c", "d"], "forget_targets": ["e", "f"]},
            "forget_texts",
        ),
        (
            {"kind": "cchg", "retain_texts": ["a"], "retain_targets": ["b"],
             "forget_texts": ["c"], "forget_targets": ["e"], "diff_clip": -1},
            "diff_clip",
        ),
        (
            {"kind": "attribute", "document": "A b. C d.", "sentences": ["Z."], "summary": "s",
             "facilitating_mask": [[1.0]]},
            "sentences",
        ),
        (
            {"kind": "attribute", "document": "A b.", "sentences": [""], "summary": "s",
             "facilitating_mask": [[1.0]]},
            "sentences",
        ),
    ],
)  # fmt: skip
def test_invalid_requests_name_the_field(body: dict, needle: str) -> None:
    assert needle in errors_of(body)


def test_defaults_follow_the_design() -> None:
    chg = ChgJob(model="m", texts=["a"], targets=["b"])
    assert (chg.num_masks, chg.num_updates, chg.num_reg_updates, chg.batch_size) == (
        10,
        500,
        500,
        32,
    )
    assert (chg.l1_weight, chg.lr, chg.threshold, chg.gradient_accum_steps) == (0.1, 1.0, 0.5, 1)
    cchg = CchgJob(
        model="m",
        retain_texts=["a"],
        retain_targets=["b"],
        forget_texts=["c"],
        forget_targets=["d"],
    )
    assert (cchg.lr, cchg.lr_end, cchg.diff_clip, cchg.batch_size) == (0.1, 0.01, 5.0, 64)
    ablate = AblateJob(model="m", texts=["a"], targets=["b"], head_mask=[[1.0]])
    assert ablate.head_mask == [[1.0]]
    attribute = AttributeJob(
        model="m", document="A b. C d.", sentences=["A b.", "C d."], summary="s",
        facilitating_mask=[[0.5]],
    )  # fmt: skip
    assert attribute.aggregate == "mean"
