-- GET with a bearer token. The URL (path and query) comes from the wrk command line.
-- Environment: BENCH_TOKEN (required); BENCH_STATUS=1 also counts responses by status code
-- (costs some client CPU, so it is off unless asked for).
local token = os.getenv("BENCH_TOKEN")
if token == nil or token == "" then
  error("BENCH_TOKEN is not set")
end
wrk.method = "GET"
wrk.headers["Authorization"] = "Bearer " .. token
wrk.headers["Accept"] = "application/json"

dofile((os.getenv("BENCH_LUA_DIR") or ".") .. "/status_counter.lua")
