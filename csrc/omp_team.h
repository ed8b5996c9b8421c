// Work on the OpenMP team of the OpenMP runtime already loaded in the process (torch's).
//
// torch runs its intra-op parallelism on an OpenMP team whose workers busy-wait for a while after each
// parallel region (OpenMP's default active wait). A second pool of our own then shares the cores with
// those spinning threads and each launch waits for a descheduled worker; on the team itself the same
// spinning workers take the work at once. The runtime is found at run time (dlsym of GOMP_parallel in
// the global symbol scope, where torch's libtorch_global_deps puts its libgomp; Intel's and LLVM's
// runtimes export the same entry point), so the extension neither links an OpenMP runtime of its own
// (a second runtime would be a second set of spinning threads) nor depends on torch at build time.
#pragma once

#include <cstdint>
#include <functional>

namespace qm {

// Whether an OpenMP runtime is loaded in the process (resolved once, at the first call), and this is not
// a child forked after that (the team's threads stay behind in the parent).
bool omp_team_available();

// Runs fn(begin, end) over [0, n) in chunks of `chunk` items handed out dynamically to a team of up to
// `threads` threads (the calling thread included), each with the denormal flags cleared. Returns false,
// having run nothing, when no OpenMP runtime is loaded. The first exception a chunk throws is rethrown
// once every chunk has been handed out.
bool omp_team_run(int64_t n, int threads, int64_t chunk, const std::function<void(int64_t, int64_t)>& fn);

}  // namespace qm
