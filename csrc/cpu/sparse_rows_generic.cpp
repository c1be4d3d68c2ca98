// Portable build of the sparse-row inner loops (see sparse_rows_impl.h).
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <cstdlib>
#include <cstring>

#include "sparse_rows.h"

#define SK_ISA_NS generic
#include "sparse_rows_impl.h"
