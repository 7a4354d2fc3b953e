-- POST a small task with a bearer token. The URL comes from the wrk command line.
-- Environment: BENCH_TOKEN (required); BENCH_STATUS=1 also counts responses by status code.
local token = os.getenv("BENCH_TOKEN")
if token == nil or token == "" then
  error("BENCH_TOKEN is not set")
end
wrk.method = "POST"
wrk.headers["Authorization"] = "Bearer " .. token
wrk.headers["Content-Type"] = "application/json"
wrk.headers["Accept"] = "application/json"
wrk.body = '{"title":"Benchmark task","description":"written by wrk","completed":false}'

dofile((os.getenv("BENCH_LUA_DIR") or ".") .. "/status_counter.lua")
