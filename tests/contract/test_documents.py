"""The job and schedule documents (``mixer_contract``): one ``parse`` each; every refusal names the field."""

from __future__ import annotations

import pytest

from mixer_contract.errors import InvalidInput
from mixer_contract.job import JobConfig
from mixer_contract.schedule import Schedule


@pytest.mark.parametrize(
    "phases, field",
    [
        ([{"start_step": 0, "weights": {"dom": 0.5, "web": 0.6}}], r"phases\[0\]\.weights: must sum to 1"),
        ([{"start_step": 0, "weights": {"dom": -0.1, "web": 1.1}}], r"weights\.dom: weight must be >= 0"),
        ([{"start_step": 0, "weights": {"chem": 1}}], r"unknown source\(s\) \['chem'\]"),
        ([{"start_step": 5, "weights": {"web": 1}}], r"phases\[0\]\.start_step: the first phase must start"),
        (
            [{"start_step": 0, "weights": {"web": 1}}, {"start_step": 0, "weights": {"dom": 1}}],
            r"phases\[1\]\.start_step: steps must increase",
        ),
        ([{"start_step": 0, "weights": {"web": 1}, "ramp": True}], r"phases\[0\]\.ramp: the last phase"),
        ([{"start_step": 0, "weights": {"web": "x"}}], r"weights\.web: weight strings must be decimals"),
        ([], r"schedule\.phases: must be a non-empty list"),
    ],
)
def test_invalid_schedules_name_the_field(phases, field):
    with pytest.raises(InvalidInput, match=field):
        Schedule.parse({"phases": phases}, ["dom", "web"])


@pytest.mark.parametrize(
    "patch, field",
    [
        ({"seq_len": 1}, "seq_len"),
        ({"global_batch": 0}, "global_batch"),
        ({"total_steps": "9"}, "total_steps"),
        ({"sources": [{"name": "a", "role": "twice"}]}, r"sources\[0\]\.role"),
        ({"sources": [{"name": "a", "role": "once"}] * 2}, "names must be unique"),
        ({"sources": [{"name": f"s{i}", "role": "once"} for i in range(257)]}, "1 to 256 sources"),
        ({"colour": 1}, r"unknown field\(s\) \['colour'\]"),
    ],
)
def test_invalid_job_configs_name_the_field(patch, field):
    base = {"sources": [{"name": "a", "role": "once"}], "seq_len": 8, "global_batch": 4, "total_steps": 10}
    with pytest.raises(InvalidInput, match=field):
        JobConfig.parse(base | patch)


