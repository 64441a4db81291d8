"""Pinned host staging of device tensors, for an MPI that cannot read GPU memory.

A device tensor bound for such an MPI is copied into page-locked host memory on a side
stream, ordered after the work that produced it, so the rank goes on queueing kernels (the
next microbatch) while the copy runs; the transport posts the MPI send once the copy's event
has fired. A payload received into pinned memory goes to the device by an asynchronous copy
on the current stream, so later kernels are ordered after it and the host does not wait.
Pinned buffers are pooled in power-of-two size classes (microbatches of a step differ in
size) and reused only after the copy or send that used them has ended.
"""

from __future__ import annotations

import torch

_SMALLEST_CLASS = 64 << 10
_IDLE_LIMIT_BYTES = 512 << 20
"""Idle pinned memory kept per transport; a buffer given back beyond it is dropped."""


class PinnedStaging:
    """Pinned host buffers and a copy stream for one device."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self._stream = torch.cuda.Stream(device)
        self._idle: dict[int, list[torch.Tensor]] = {}
        """Whole pooled buffers (uint8) by size class."""
        self._idle_bytes = 0
        self._in_use: list[tuple[torch.cuda.Event, torch.Tensor]] = []
        """Buffers a device copy still reads or writes, with the event that ends it."""

    def to_host(self, tensor: torch.Tensor) -> tuple[torch.Tensor, torch.cuda.Event]:
        """Starts copying ``tensor`` into a pinned buffer; returns it and the copy's event.

        The copy waits for the producing stream's work queued so far, and the caching
        allocator is told the side stream reads ``tensor`` (it must not reuse the memory
        before the copy ends)."""
        host = self.host_buffer(tensor.nbytes).view(tensor.dtype).view(tensor.shape)
        self._stream.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(self._stream):
            host.copy_(tensor.detach(), non_blocking=True)
            ready = _event()
            ready.record(self._stream)
        tensor.record_stream(self._stream)
        return host, ready

    def to_device(self, host: torch.Tensor) -> torch.Tensor:
        """An asynchronous copy of a received pinned ``host`` tensor onto the device; the
        buffer goes back to the pool once the copy has ended."""
        tensor = torch.empty(host.shape, dtype=host.dtype, device=self.device)
        tensor.copy_(host, non_blocking=True)
        done = _event()
        done.record(torch.cuda.current_stream(self.device))
        self._in_use.append((done, host))
        return tensor

    def host_buffer(self, nbytes: int) -> torch.Tensor:
        """The first ``nbytes`` of a pinned byte buffer that no copy or send is using."""
        self._reclaim()
        size = max(_SMALLEST_CLASS, 1 << (nbytes - 1).bit_length())
        idle = self._idle.get(size)
        if idle:
            self._idle_bytes -= size
            return idle.pop()[:nbytes]
        return torch.empty(size, dtype=torch.uint8, pin_memory=True)[:nbytes]

    def _reclaim(self) -> None:
        busy = []
        for event, buffer in self._in_use:
            if event.query():
                self.release(buffer)
            else:
                busy.append((event, buffer))
        self._in_use = busy

    def release(self, view: torch.Tensor) -> None:
        """Pools the whole buffer behind ``view`` (any view of a pooled buffer) once nothing
        uses it: a sent ``to_host`` buffer (its copy ended before the send was posted), or a
        received one whose copy to the device has ended."""
        whole = torch.empty(0, dtype=torch.uint8).set_(view.untyped_storage())
        size = whole.numel()
        if self._idle_bytes + size <= _IDLE_LIMIT_BYTES:
            self._idle.setdefault(size, []).append(whole)
            self._idle_bytes += size


def _event() -> torch.cuda.Event:
    """An event whose ``synchronize`` sleeps rather than spins (ranks may share cores)."""
    return torch.cuda.Event(blocking=True)
