"""Pinned host staging of device tensors, for an MPI that cannot read GPU memory.

A device tensor bound for such an MPI is copied into page-locked host memory on a side
stream, ordered after the work that produced it, so the rank goes on queueing kernels (the
next microbatch) while the copy runs; the transport posts the MPI send once the copy's event
has fired. A payload received into pinned memory goes to the device by an asynchronous copy
on the current stream, so later kernels are ordered after it and the host does not wait.
Pinned buffers are pooled by size and reused only after the copy that used them has ended.
"""

from __future__ import annotations

import torch

_POOL_LIMIT = 64
"""Idle pinned buffers kept per transport; beyond it the oldest are given back to torch."""


class PinnedStaging:
    """Pinned host buffers and a copy stream for one device."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self._stream = torch.cuda.Stream(device)
        self._idle: dict[int, list[torch.Tensor]] = {}
        self._in_use: list[tuple[torch.cuda.Event, torch.Tensor]] = []
        """Buffers a device copy still reads or writes, with the event that ends it."""

    def to_host(self, tensor: torch.Tensor) -> tuple[torch.Tensor, torch.cuda.Event]:
        """Starts copying ``tensor`` into a pinned buffer; returns it and the copy's event.

        The copy waits for the producing stream's work queued so far, and the caching
        allocator is told the side stream reads ``tensor`` (it must not reuse the memory
        before the copy ends)."""
        host = self.host_buffer(tensor.nbytes).view(tensor.dtype).view(tensor.shape)
        producer = torch.cuda.current_stream(self.device)
        self._stream.wait_stream(producer)
        with torch.cuda.stream(self._stream):
            host.copy_(tensor.detach(), non_blocking=True)
            ready = torch.cuda.Event()
            ready.record(self._stream)
        tensor.record_stream(self._stream)
        return host, ready

    def to_device(self, host: torch.Tensor) -> torch.Tensor:
        """An asynchronous copy of a received pinned ``host`` tensor onto the device; the
        buffer goes back to the pool once the copy has ended."""
        tensor = torch.empty(host.shape, dtype=host.dtype, device=self.device)
        tensor.copy_(host, non_blocking=True)
        done = torch.cuda.Event()
        done.record(torch.cuda.current_stream(self.device))
        self._in_use.append((done, host))
        return tensor

    def host_buffer(self, nbytes: int) -> torch.Tensor:
        """A pinned byte buffer of ``nbytes`` that no copy is using."""
        self._reclaim()
        idle = self._idle.get(nbytes)
        if idle:
            return idle.pop()
        return torch.empty(nbytes, dtype=torch.uint8, pin_memory=True)

    def release(self, host: torch.Tensor) -> None:
        """Gives back a buffer from ``to_host`` once MPI has sent it (its copy had ended
        before the send was posted)."""
        self._keep_idle(host)

    def _reclaim(self) -> None:
        busy = []
        for event, buffer in self._in_use:
            if event.query():
                self._keep_idle(buffer)
            else:
                busy.append((event, buffer))
        self._in_use = busy

    def _keep_idle(self, buffer: torch.Tensor) -> None:
        flat = buffer.reshape(-1).view(torch.uint8)  # a view: pooled buffers are contiguous
        if sum(map(len, self._idle.values())) < _POOL_LIMIT:
            self._idle.setdefault(flat.numel(), []).append(flat)
