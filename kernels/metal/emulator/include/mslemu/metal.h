// Umbrella header behind <metal_stdlib> (and every <metal_*> name): the library part of MSL, in
// dependency order. It is included where the kernel source includes <metal_stdlib>, with the
// source's earlier macros still defined (as on a Mac), so its template parameters use all-caps
// names like Apple's headers do and a macro such as `#define R 4` breaks it the same way.
// The types and keywords Apple's compiler knows without any include are in prelude.h.
#pragma once
#include "prelude.h"
#include "type_traits.h"
#include "constants.h"
#include "math.h"
#include "runtime_api.h"
#include "simd.h"
#include "matrix.h"
#include "atomic.h"
#include "logging.h"
#include "mlx_support.h"
