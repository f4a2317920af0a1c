-- jmoshi-server behind HAProxy: hold a new conversation for a few seconds while every GPU is
-- talking, so one that is just ending goes to the person who is waiting instead of a "busy".
--
--   http-request lua.jmoshi_wait_for_gpu <backend> <seconds>
--
-- Returns as soon as <backend> has a free connection slot (each GPU server there has
-- `maxconn 1`), when it has no usable server at all (waiting would not help), or after
-- <seconds>. The routing decision itself stays in haproxy.cfg (be_conn_free): HAProxy runs
-- with one thread, so nothing else runs between this action returning and that decision.
-- Sleeping does not count towards tune.lua.session-timeout.

local POLL_MS = 100

local function now_ms()
  local now = core.now()
  return now.sec * 1000 + now.usec / 1000
end

core.register_action("jmoshi_wait_for_gpu", { "http-req" }, function(txn, backend, seconds)
  local deadline = now_ms() + tonumber(seconds) * 1000
  while now_ms() < deadline do
    if txn.f:nbsrv(backend) == 0 or txn.f:be_conn_free(backend) > 0 then
      return
    end
    core.msleep(POLL_MS)
  end
end, 2)
