// libmoe: everything public.
#pragma once
#include "moe/checkpoint.hpp"
#include "moe/error.hpp"
#include "moe/layer.hpp"
#include "moe/optim.hpp"
#include "moe/router.hpp"
#include "moe/tensor.hpp"
