// Catch2 v2 main for the CPU test executables (one per chapter).
#define CATCH_CONFIG_MAIN
#include <catch2/catch.hpp>
