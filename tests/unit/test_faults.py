"""The one-line messages of orchestrator/faults.py, from the exceptions each allocator raises."""

from __future__ import annotations

import resource

from orchestrator import faults

CPU = RuntimeError("[enforce fail at alloc_cpu.cpp:127] err == 0. DefaultCPUAllocator: can't allocate memory: you tried "
                   "to allocate 4000000000 bytes. Error code 12 (Cannot allocate memory)")
CUDA = RuntimeError("CUDA out of memory. Tried to allocate 2.50 GiB (GPU 0; 79.10 GiB total capacity)")


def test_out_of_memory_is_told_from_other_errors():
    assert faults.is_out_of_memory(MemoryError())
    assert faults.is_out_of_memory(CPU) and faults.is_out_of_memory(CUDA)
    assert not faults.is_out_of_memory(RuntimeError("Timed out waiting 10000ms for recv operation"))
    assert not faults.is_out_of_memory(ValueError("can't allocate memory"))  # not an allocator's error type


def test_out_of_memory_line_names_phase_size_and_fix():
    unlimited = resource.getrlimit(resource.RLIMIT_AS)[0] == resource.RLIM_INFINITY
    line = faults.out_of_memory_message(CPU, "step 1", rank=3)
    assert line.startswith("out of memory on rank 3 during step 1: an allocation of 3,814.7 MiB failed")
    assert "trainer.micro_batch_size" in line and "python -m orchestrator.plan" in line and "\n" not in line
    assert ("ulimit -v" in line) != unlimited
    assert "an allocation of 2,560.0 MiB failed" in faults.out_of_memory_message(CUDA, "step 7", rank=0)
    data = faults.out_of_memory_message(MemoryError(), "data preparation", rank=0)
    assert "during data preparation: MemoryError" in data and "data.num_workers" in data
