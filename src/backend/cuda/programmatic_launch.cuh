// Hopper's programmatic dependent launch, the device side: a kernel launched with
// cudaLaunchAttributeProgrammaticStreamSerialization may start before the kernel before it in the stream has ended.
// Both are no-ops below compute capability 9.0, where every launch waits for the kernel before it.
#pragma once

namespace kvarn::cuda {

// Waits until the kernel before this one in the stream has finished and its writes are visible. A no-op unless
// the launch overlaps it (DecodeAttentionArgs::overlap_previous_kernel: a programmatic dependent launch), in which
// case what that kernel may write (q, the tails) is read only after this, and nothing is written before it.
__device__ __forceinline__ void wait_for_previous_kernel() {
#if __CUDA_ARCH__ >= 900
  asm volatile("griddepcontrol.wait;" ::: "memory");
#endif
}

// Lets the kernel after this one in the stream launch, if it is a programmatic dependent, once every CTA of this
// grid has called this or exited (it still waits for this grid's end before reading what it writes).
__device__ __forceinline__ void release_next_kernel() {
#if __CUDA_ARCH__ >= 900
  asm volatile("griddepcontrol.launch_dependents;");
#endif
}

}  // namespace kvarn::cuda
