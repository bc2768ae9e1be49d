"""Several processes (hosts) serving one model: JAX's own distributed runtime, one leader.

Every process runs `jax.distributed.initialize` and the same compiled step over one global mesh
(engine/parallel.py). Process 0 is the leader: it owns the scheduler, the HTTP server and the
sampling state; each step it sends the step's inputs (bucket, token ids, metadata, sampling state) to
the others through JAX's own collectives (`multihost_utils.broadcast_one_to_all`), so every process
calls the step with the same inputs and samples the same tokens (the followers keep a checksum of
theirs, compared with the leader's at shutdown). A process that dies is noticed by the coordination
service's heartbeat, which ends the others with an error instead of a hang.
"""

from __future__ import annotations

import logging
import zlib

import jax
import numpy as np
from jax.experimental import multihost_utils

log = logging.getLogger("engine")

STEP, STOP = 1, 2
HEARTBEAT_TIMEOUT_S = 30  # a dead process ends the others within about this long (a busy host still beats)


def initialize(coordinator_address: str | None, num_processes: int | None, process_id: int | None) -> None:
    """jax.distributed.initialize, before anything touches a device (no-op when already done).

    Args:
      coordinator_address: "host:port" of process 0's coordination service (None: detected, on a
        TPU pod or a cluster JAX knows).
      num_processes, process_id: this job's size and this process's index (None: detected).
    Raises:
      ValueError: process_id outside [0, num_processes), naming the argument.
    """
    if num_processes is not None and process_id is not None and not 0 <= process_id < num_processes:
        raise ValueError(f"process_id: {process_id} is outside [0, num_processes={num_processes})")
    if jax.distributed.is_initialized():
        return
    if jax.config.jax_platforms == "cpu":  # (set from JAX_PLATFORMS when jax starts)
        jax.config.update("jax_cpu_collectives_implementation", "gloo")  # CPU collectives across processes
    jax.distributed.initialize(coordinator_address, num_processes, process_id,
                               heartbeat_timeout_seconds=HEARTBEAT_TIMEOUT_S)
    log.info("process %d of %d: %d local devices, %d in all", jax.process_index(), jax.process_count(),
             jax.local_device_count(), jax.device_count())


def check_same_config(options: dict) -> None:
    """Every process must be started with the same engine options (a collective).

    Raises:
      ValueError: naming the processes whose options differ from process 0's.
    """
    import json

    sums = _every_process(zlib.crc32(json.dumps(options, sort_keys=True, default=str).encode()))
    differ = [i for i, c in enumerate(sums) if c != sums[0]]
    if differ:
        raise ValueError(f"processes {differ} were started with engine options that differ from process 0's "
                         f"(this process's: {options})")


def is_leader() -> bool:
    return jax.process_index() == 0


class StepChannel:
    """The leader's step inputs, delivered to every process (each call is a collective: every
    process makes the same calls in the same order)."""

    def __init__(self) -> None:
        self.leader = is_leader()
        self.steps = 0
        self.checksum = 0  # crc32 of the tokens sampled so far

    def send(self, bucket: int, batch: dict, samp: dict) -> None:
        """Leader: announce a step of `bucket` tokens and its inputs."""
        multihost_utils.broadcast_one_to_all(np.array([STEP, bucket], np.int32))
        multihost_utils.broadcast_one_to_all(_to_wire(batch, samp))

    def stop(self) -> None:
        """Leader: tell the followers to leave their loop."""
        multihost_utils.broadcast_one_to_all(np.array([STOP, 0], np.int32))

    def receive(self, empty_inputs) -> tuple[int, dict, dict] | None:
        """Follower: the next step's (bucket, batch, samp), or None when the leader stops.

        Args:
          empty_inputs: bucket -> (batch, samp) of that bucket's shapes (ModelRunner._inputs_for).
        """
        command, bucket = (int(v) for v in multihost_utils.broadcast_one_to_all(np.zeros(2, np.int32)))
        if command == STOP:
            return None
        batch, samp = empty_inputs(bucket)
        wire = multihost_utils.broadcast_one_to_all(_to_wire(batch, samp))
        return (bucket, *_from_wire(wire))

    def record(self, tokens: np.ndarray) -> None:
        """Fold this step's sampled tokens into the checksum."""
        self.steps += 1
        self.checksum = zlib.crc32(np.ascontiguousarray(tokens, np.int32).tobytes(), self.checksum)

    def agree(self) -> list[int]:
        """Every process's checksum (a collective); the leader checks they are equal."""
        return _every_process(self.checksum)


def _every_process(value: int) -> list[int]:
    """One int from every process, in process order (a collective)."""
    return [int(c) for c in multihost_utils.process_allgather(np.array([value], np.int64)).ravel()]


FLAGS = ("any_filter", "any_top", "any_bias", "any_mask")  # the sampler's bool scalars (collectives carry numbers)


def _to_wire(batch: dict, samp: dict) -> dict:
    # collectives carry numbers
    samp = dict(samp, **{k: np.asarray(samp[k], np.int32) for k in FLAGS})
    return {"batch": batch, "samp": samp}


def _from_wire(wire: dict) -> tuple[dict, dict]:
    batch = {k: np.asarray(v) for k, v in wire["batch"].items()}
    samp = {k: np.asarray(v) for k, v in wire["samp"].items()}
    samp.update({k: np.bool_(samp[k]) for k in FLAGS})
    return batch, samp
