-- PATCH with no body and a bearer token (PATCH /api/{id}/tasks/{tid}/complete). The URL comes
-- from the wrk command line. Environment: BENCH_TOKEN (required); BENCH_STATUS=1 also counts
-- responses by status code.
local token = os.getenv("BENCH_TOKEN")
if token == nil or token == "" then
  error("BENCH_TOKEN is not set")
end
wrk.method = "PATCH"
wrk.headers["Authorization"] = "Bearer " .. token
wrk.headers["Accept"] = "application/json"

dofile((os.getenv("BENCH_LUA_DIR") or ".") .. "/status_counter.lua")
