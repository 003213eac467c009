"""The loopback Hub server the Hub tests run the real ``huggingface_hub`` client against: see
:mod:`ntk_rankgen_assets.fake_hub` (also used by ``examples/hub_share.py --local-hub``)."""

from ntk_rankgen_assets.fake_hub import FakeHub, git_blob_id

__all__ = ["FakeHub", "git_blob_id"]
