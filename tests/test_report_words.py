"""The report's words: section numbers from one list, numbers rounded for reading, and the glitches seen in the
default report (a repeated clause, a sink said to form before the block it forms in)."""

import pytest
import torch

from massact.analysis.causal.verification import _values_at
from massact.analysis.function.sinks import SinkPass, _summary
from massact.numbers import short
from massact.report.sections import EXTRAS, SECTIONS, names, section


def test_sections_are_numbered_in_order_from_one_list():
    assert [s.number for s in SECTIONS] == list(range(1, 15))
    assert len({s.key for s in SECTIONS + EXTRAS}) == len(SECTIONS) + len(EXTRAS)
    assert section("trigger").heading == "7. Trigger: why the writing neurons fire there"
    assert section("11") is section("quantization") and section("conclusion").title == "Conclusion"
    assert "super-weights (8)" in names() and names().endswith("warnings, conclusion")
    assert section("13") is section("valley")
    assert section("14") is section("qk")
    with pytest.raises(KeyError):
        section("15")


@pytest.mark.parametrize("value, text", [(24494.1, "24.5k"), (-24494.1, "-24.5k"), (1_234_567, "1.23M"), (123_456, "123k"),
                                         (999.96, "1k"), (826.8, "827"), (48.37, "48.4"), (0.01234, "0.0123"), (0.0, "0")])
def test_short_numbers_for_reading(value, text):
    assert short(value) == text
    assert short(value, signed=True) == (text if value < 0 else "+" + text)


def test_a_dim_massive_only_at_its_birth_block_is_named_once():
    assert _values_at(11, 21.04, 11, 21.04) == "at block 11: +21.0"
    assert _values_at(2, 0.31, 20, 1.2) == "at block 2: +0.3; at block 20: +1.2"


def test_the_sink_at_the_birth_block_is_not_said_to_come_before_it():
    rate = torch.tensor([0.9, 0.9, 0.9])
    base = SinkPass(texts=1, share=torch.full((3, 4), 0.5), uniform=torch.full((3, 4), 0.2), rate=rate, value_ratio=None, output_share=None)
    assert _summary(base, [0, 1, 2], 0, 0.3).startswith("the sink forms at block 0 (at the birth block itself);")
    assert _summary(base, [0, 1, 2], 2, 0.3).startswith("the sink forms at block 0 (2 blocks before the birth block 2);")
    assert _summary(base, [1, 2], 0, 0.3).startswith("the sink forms at block 1 (right after the birth block);")
