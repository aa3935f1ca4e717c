#include "../pymodule.h"
ANYDEPTH_PY_MODULE(_C_cuda)
