// Portable build of the sparse-row inner loops (nm_rows_impl.h, bitmask_rows_impl.h,
// block_rows_impl.h; the rules in rows_common_impl.h).
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <cstring>

#include "sparse_rows.h"

#define SK_ISA_NS generic
#include "nm_rows_impl.h"
#include "bitmask_rows_impl.h"
#include "block_rows_impl.h"
