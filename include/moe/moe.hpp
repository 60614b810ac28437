// libmoe: everything public.
#pragma once
#include "moe/error.hpp"
#include "moe/layer.hpp"
#include "moe/router.hpp"
#include "moe/tensor.hpp"
