-- The login flood: POST /token with the OAuth2 password form and the right password (so every
-- request costs one bcrypt verification and none counts as a failed login).
-- Environment: BENCH_USERNAME, BENCH_PASSWORD (required); BENCH_STATUS=1 also counts responses
-- by status code.
local username = os.getenv("BENCH_USERNAME")
local password = os.getenv("BENCH_PASSWORD")
if username == nil or username == "" or password == nil or password == "" then
  error("BENCH_USERNAME and BENCH_PASSWORD must be set")
end
local function form_escape(s)
  return (s:gsub("[^%w%-%._~]", function(c) return string.format("%%%02X", string.byte(c)) end))
end
wrk.method = "POST"
wrk.headers["Content-Type"] = "application/x-www-form-urlencoded"
wrk.headers["Accept"] = "application/json"
wrk.body = "grant_type=password&username=" .. form_escape(username) .. "&password=" .. form_escape(password)

dofile((os.getenv("BENCH_LUA_DIR") or ".") .. "/status_counter.lua")
