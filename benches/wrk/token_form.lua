-- The login flood: POST /token with the OAuth2 password form and the right password, so every
-- request costs one bcrypt verification and none counts as a failed login. The requests go
-- round-robin over several accounts: the server takes a throttle slot per email (10 per minute
-- in flight or failed) before it checks the password, so one account alone would be answered
-- 429 beyond 10 concurrent logins instead of being hashed.
-- Environment: BENCH_USERNAMES (comma-separated emails), BENCH_PASSWORD (required);
-- BENCH_STATUS=1 also counts responses by status code.
local usernames = os.getenv("BENCH_USERNAMES")
local password = os.getenv("BENCH_PASSWORD")
if usernames == nil or usernames == "" or password == nil or password == "" then
  error("BENCH_USERNAMES and BENCH_PASSWORD must be set")
end
local function form_escape(s)
  return (s:gsub("[^%w%-%._~]", function(c) return string.format("%%%02X", string.byte(c)) end))
end
wrk.method = "POST"
wrk.headers["Content-Type"] = "application/x-www-form-urlencoded"
wrk.headers["Accept"] = "application/json"

local bodies = {}
for username in string.gmatch(usernames, "[^,]+") do
  table.insert(bodies, "grant_type=password&username=" .. form_escape(username)
    .. "&password=" .. form_escape(password))
end
local next_body = 0

function request()
  next_body = next_body % #bodies + 1
  return wrk.format(nil, nil, nil, bodies[next_body])
end

dofile((os.getenv("BENCH_LUA_DIR") or ".") .. "/status_counter.lua")
