"""Data: WebDataset training loader, shard writer, and (synthetic.py) the tiny world.

    loader = build_loader(cfg.data, rank=rank, world_size=world, seed=cfg.trainer.seed)
    for batch in loader: ...   # endless; loader.state_dict() / load_state_dict() resume exactly

See docs/data.md.
"""

from distill.data.config import DataConfig
from distill.data.shards import DataError, expand_urls
from distill.data.wds import OnceLoader, TrainLoader, build_loader
from distill.data.writer import ShardWriter

__all__ = ["DataConfig", "DataError", "OnceLoader", "ShardWriter", "TrainLoader", "build_loader", "expand_urls"]
