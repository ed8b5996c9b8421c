// Page hints for large kernel outputs.
#pragma once

#include <cstddef>

namespace qm {

// Asks the kernel to back the 2 MiB-aligned interior of [p, p + bytes) with transparent huge pages
// (madvise MADV_HUGEPAGE) before the kernel first writes it. Freshly allocated outputs are untouched
// memory: with 4 KiB pages, first-touch page faults cost as much as quantizing (a 90 MB output takes
// ~22k faults). Only a hint: it never changes contents, and failures are ignored. Small buffers
// (< 4 MiB) are left alone.
void advise_hugepages(void* p, size_t bytes);

}  // namespace qm
