"""Each training worker's batches: from data built once on the driver (dlray.data.build_data, put in
Ray's object store: a DataLoader over this worker's share), or streamed from its Ray Data shard
(dlray.streaming). The loop sees the same thing from both:

    batches, data_info, tokenizer = worker_data(config, cfg, rank, world, device)

    batches.micro_batches            micro-batches per epoch, the same on every rank
    batches.train(epoch, done,       (fields, weight, skipped) per micro-batch; weight None: every row counts.
        prefetch_next)               `done`: the epoch's micro-batches every rank has trained already (a run
                                     resumed mid-epoch): the epoch goes on from the next one. `prefetch_next`:
                                     another epoch follows (streamed data starts it while this one ends)
    batches.eval("val" | "test")     (fields, weight): every row once across ranks, padding at weight 0

Mid-epoch resume is exact because an epoch's order is a function of (train.seed, epoch) alone: in memory, a
seeded permutation of which each rank takes every world-th index (DistributedSampler's); streamed, Ray Data's
ordered equal split and a shuffle buffer seeded by (train.seed, epoch) (dlray.streaming). Going on after
`done` micro-batches takes the rest of the same order, so every row is trained once in the epoch.
"""

from __future__ import annotations

import math
import threading
from itertools import islice

import ray
import ray.train
import torch
from torch.utils.data import DataLoader, Dataset, DistributedSampler

from dlray.config import JobConfig


def worker_data(config: dict, cfg: JobConfig, rank: int, world: int, device: torch.device) -> tuple[InMemoryBatches | StreamedBatches, dict, object]:
    """This worker's batches, the data's info (what the model is built from) and its tokenizer (None for images),
    from what the driver prepared (dlray.train.prepare_data): config["streamed"], or config["in_memory"]."""
    if config["streamed"]:
        return StreamedBatches(config["streamed"], cfg, world, device), config["streamed"]["info"], config["streamed"]["tokenizer"]
    data = ray.get(config["in_memory"])
    return InMemoryBatches(data, cfg, rank, world, device), data.info, data.tokenizer


class InMemoryBatches:
    def __init__(self, data, cfg: JobConfig, rank: int, world: int, device: torch.device):
        self.data, self.cfg, self.rank, self.world, self.device = data, cfg, rank, world, device
        self.sampler = ResumableSampler(data.train, cfg.train.seed, rank, world)
        # The loader's own generator, reseeded each epoch, seeds its worker processes: drawing that seed from
        # the global RNG (the default) would shift the dropout stream of a run resumed mid-epoch by one draw.
        self.generator = torch.Generator()
        self.loader: DataLoader = DataLoader(data.train, cfg.train.micro_batch_size, sampler=self.sampler, generator=self.generator,
                                             **loader_options(cfg, device))
        accumulation = cfg.train.gradient_accumulation_steps
        self.micro_batches = len(self.loader) // accumulation * accumulation  # whole optimizer steps; the rest waits for the next epoch's shuffle
        self.rows = {split: size(getattr(data, split)) for split in ("train", "val", "test")}

    def train(self, epoch: int, done: int = 0, prefetch_next: bool = False):
        self.sampler.set_epoch(epoch, skip=done * self.cfg.train.micro_batch_size)  # a new shuffle each epoch, identical across ranks
        self.generator.manual_seed(self.cfg.train.seed + epoch)
        for index, batch in enumerate(self.loader, start=done):
            if index == self.micro_batches:
                return
            yield batch, None, None

    def eval(self, split: str):
        return DataLoader(EvalShard(getattr(self.data, split), self.rank, self.world), self.cfg.train.micro_batch_size, **loader_options(self.cfg, self.device))


class StreamedBatches:
    """This rank's shards of the streamed splits. Every rank gets the same number of rows (the
    splits are padded with weight-0 rows to a multiple of the worker count), so the same number
    of micro-batches: the last one may be partial, and nothing is dropped."""

    def __init__(self, spec: dict, cfg: JobConfig, world: int, device: torch.device, shard=None):
        """`shard`: split -> this rank's DataIterator (Ray Train's get_dataset_shard; tests give their own)."""
        self.spec, self.cfg, self.pin_memory = spec, cfg, device.type == "cuda"
        self.shard = shard or ray.train.get_dataset_shard
        self.rows = spec["rows"]
        self.micro_batches = math.ceil(math.ceil(self.rows["train"] / world) / cfg.train.micro_batch_size)
        self.ahead: dict[int, FirstBatchAhead] = {}

    def train(self, epoch: int, done: int = 0, prefetch_next: bool = False):
        """`done` > 0 replays the epoch's order, reading and dropping the first `done` micro-batches: the rows
        are read again, not trained again (Ray Data has no position to seek to within a shuffled stream)."""
        ahead = self.ahead.pop(epoch, None)  # only ever an epoch started from its first batch in this process
        yield from ahead if ahead is not None else islice(self._epoch(epoch), done, None)
        # Ray Data starts each epoch's execution when it is first iterated: start the next one now, while
        # this epoch validates and checkpoints, instead of at the next epoch's first step.
        if prefetch_next:
            self.ahead[epoch + 1] = FirstBatchAhead(self._epoch(epoch + 1))

    def _epoch(self, epoch: int):
        return streamed_batches(self.shard("train"), self.spec["columns"], self.cfg.train.micro_batch_size,
                                self.cfg.train.seed + epoch, self.cfg.data.local_shuffle_buffer_size, self.pin_memory)

    def eval(self, split: str):
        for fields, weight, _ in streamed_batches(self.shard(split), self.spec["columns"], self.cfg.train.micro_batch_size,
                                                  None, 0, self.pin_memory):
            yield fields, weight


class FirstBatchAhead:
    """An iterator whose first item a background thread fetches from the start."""

    def __init__(self, iterator):
        self.iterator, self.first, self.error = iterator, [], None
        self.thread = threading.Thread(target=self._fetch_first, daemon=True)
        self.thread.start()

    def _fetch_first(self) -> None:
        try:
            self.first = [next(self.iterator)]
        except StopIteration:
            pass
        except BaseException as err:  # noqa: BLE001 - raised in the consumer's thread
            self.error = err

    def __iter__(self):
        self.thread.join()
        if self.error is not None:
            raise self.error
        yield from self.first
        yield from self.iterator


class ResumableSampler(DistributedSampler):
    """Rank `rank`'s share of the training set: every sample once per epoch across ranks (padded by at
    most world - 1 repeats so that every rank takes the same number of steps, as FSDP and ZeRO-3 need),
    reshuffled by `set_epoch` identically on every rank; after `set_epoch(epoch, skip=k)`, the share
    without its first k samples, where the epoch goes on after k of them (a run resumed mid-epoch)."""

    def __init__(self, dataset: Dataset, seed: int, rank: int, world: int):
        super().__init__(dataset, num_replicas=world, rank=rank, shuffle=True, seed=seed)
        self.skip = 0

    def set_epoch(self, epoch: int, skip: int = 0) -> None:
        super().set_epoch(epoch)
        self.skip = skip

    def __iter__(self):
        return islice(super().__iter__(), self.skip, None)

    def __len__(self) -> int:
        return self.num_samples - self.skip


class EvalShard(Dataset):
    """Rank `rank`'s share of an evaluation set: every sample exactly once across ranks.

    Shards are padded to equal length (FSDP and ZeRO-3 need every rank to run the same number
    of forward passes); padding items carry weight 0 so they do not count.
    """

    def __init__(self, dataset: Dataset, rank: int, world: int):
        self.dataset, self.n = dataset, size(dataset)
        self.indices = range(rank, world * math.ceil(self.n / world), world)

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, i: int):
        index = self.indices[i]
        return self.dataset[index % self.n], float(index < self.n)


def loader_options(cfg: JobConfig, device: torch.device) -> dict:
    # Pinned (page-locked) batches copy to a GPU asynchronously (to_device's non_blocking).
    workers = cfg.data.dataloader_num_workers
    return {"num_workers": workers, "pin_memory": device.type == "cuda", "persistent_workers": workers > 0}


def size(dataset: Dataset) -> int:
    return len(dataset)  # type: ignore[arg-type]  # torch's Dataset does not declare __len__; every dlray dataset has one


def streamed_batches(shard, columns: tuple[str, ...], batch_size: int, shuffle_seed: int | None, buffer_size: int, pin_memory: bool = False):
    """This worker's batches of a split: (fields in `columns` order, weight, skipped), on the CPU."""
    for batch in shard.iter_torch_batches(batch_size=batch_size, device="cpu", pin_memory=pin_memory, drop_last=False,
                                          local_shuffle_buffer_size=buffer_size if shuffle_seed is not None else None,
                                          local_shuffle_seed=shuffle_seed):
        yield [batch[name] for name in columns], batch["weight"], batch["skipped"]
