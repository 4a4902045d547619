// Umbrella header: the MSL surface the emulator provides, in dependency order.
#pragma once
#include "keywords.h"
#include "types.h"
#include "vectors.h"
#include "math.h"
#include "runtime_api.h"
#include "simd.h"
#include "matrix.h"
#include "atomic.h"
#include "binding.h"
