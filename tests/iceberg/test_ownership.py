"""One writer per dataset: a dataset claimed by a streaming job refuses direct batch loads."""

from __future__ import annotations

from pathlib import Path

import pytest

from chronolake.iceberg.ownership import DatasetOwned, StreamOwner, claim, release
from chronolake.lake import Lake


def test_a_claimed_dataset_refuses_batch_loads_until_released(lake: Lake, tmp_path: Path) -> None:
    dataset = lake.create_dataset("prices", key=["id"], columns=["price:double"])
    source = tmp_path / "prices.csv"
    source.write_text("id,price,valid_from\na,1.5,2024-01-01\n")
    owner = claim(dataset.table.table, StreamOwner("kafka", "assertions", "127.0.0.1:9092"))
    assert lake.dataset("prices").stream_owner() == owner
    # Claiming again for the same stream keeps the original claim; another stream is refused.
    assert claim(dataset.table.table, StreamOwner("kafka", "assertions", "127.0.0.1:9092")) == owner
    with pytest.raises(DatasetOwned, match="already written by the streaming job reading kafka 'assertions'"):
        claim(dataset.table.table, StreamOwner("kafka", "other", "127.0.0.1:9092"))

    with pytest.raises(DatasetOwned, match=r"written by the streaming job reading kafka 'assertions' at 127.0.0.1:9092.*--via-stream"):
        lake.dataset("prices").load([source])
    assert lake.dataset("prices").table.table.current_snapshot() is None  # nothing written

    assert release(lake.dataset("prices").table.table) == owner
    assert lake.dataset("prices").stream_owner() is None
    assert lake.dataset("prices").load([source]).applied == 1
