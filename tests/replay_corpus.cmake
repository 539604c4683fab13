# Runs the fuzz harness BIN in replay mode over every file in DIR (a CTest test cannot
# expand a glob itself); each file must be read, not refused.
file(GLOB seeds "${DIR}/*")
if(NOT seeds)
  message(FATAL_ERROR "no seed files in ${DIR}")
endif()
execute_process(COMMAND "${BIN}" --expect-read ${seeds} RESULT_VARIABLE rc)
if(NOT rc EQUAL 0)
  message(FATAL_ERROR "fuzz_readers refused a seed (exit ${rc})")
endif()
