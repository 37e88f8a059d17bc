-- paddler.lua: the HAProxy side of llama.cpp-aware balancing (HAProxy 2.6+, Lua 5.3).
--
-- HAProxy itself does the balancing: leastconn, per-server maxconn = llama.cpp slots (set live
-- by paddler-agent over agent-check), and the backend queue as the request buffer. This file
-- adds what HAProxy has no directive for:
--
--   lua.paddler_admit   http-request action. Bounds the buffer (HAProxy's queue plus requests
--                       held here) at max_buffered_requests, and when no server is usable at all
--                       (all down, or scaling from zero) holds the request, yielding, until one
--                       is or buffered_request_timeout passes. It only sets the variable
--                       txn.paddler_verdict to "overflow" or "timeout"; haproxy.cfg decides
--                       what to answer.
--   lua.paddler_health  http service: Paddler-compatible aggregated /health,
--                       {"status":"ok","slots_idle":N,"slots_processing":M,"requests_buffered":K}.
--   lua.paddler_route   sample fetch: the request as llama-server will route it, "METHOD:path",
--                       the path decoded the way llama-server's HTTP library does it (see
--                       route_key below). haproxy.cfg's allow-list ACLs match it exactly.
--   lua.paddler_read    http-request action on the routes whose JSON body names a model: with routing
--                       by model, sets txn.paddler_pool to the model's backend, or why none:
--                       too_large, malformed, absent, unknown (haproxy.cfg answers those itself; each
--                       model's backend has its own queue and limits, PADDLER_MODELS, and
--                       GET /health?model=NAME answers for one model); with affinity (PADDLER_AFFINITY),
--                       keeps the request's conversation keys.
--   lua.paddler_affine  http-request action (backend): txn.paddler_affine = the server that served the
--                       conversation, when it has a slot free now (use-server rules send it there), or
--                       once it has one within PADDLER_AFFINITY_WAIT_MS, while another has a slot free.
--   lua.paddler_remember  http-response action: remembers which server served the conversation.
--   handover task       only in a worker started by a reload (master-worker mode, SIGUSR2): the
--                       old worker still runs its streams, and feeds its queue to the same
--                       llama-servers, while this one starts counting from zero. See "Handover".
--
-- haproxy.cfg lines (paddler-gen haproxy writes them; the names are the fleet file's, and each
-- is required: HAProxy refuses to start when one is missing or not a number):
--   global
--       setenv PADDLER_BACKEND llama
--       setenv PADDLER_MAX_BUFFERED_REQUESTS 30
--       setenv PADDLER_BUFFERED_REQUEST_TIMEOUT_MS 10000
--       setenv PADDLER_MODELS alpha,30,10000/beta,50,20000   routing by model only, with:
--       setenv PADDLER_MAX_REQUEST_BODY 1048576               required with PADDLER_MODELS
--       setenv PADDLER_DEFAULT_MODEL alpha                    optional
--       setenv PADDLER_AFFINITY on                            prompt-cache affinity only, with:
--       setenv PADDLER_AFFINITY_WAIT_MS 500                   optional
--       lua-load /etc/haproxy/paddler/paddler.lua
--   frontend llm
--       http-request set-var(txn.paddler_route) lua.paddler_route
--       http-request use-service lua.paddler_health if { var(txn.paddler_route) -m str GET:/health }
--       acl route_forward var(txn.paddler_route) -m str POST:/v1/chat/completions OPTIONS:/v1/chat/completions
--       http-request return status 404 ... if !route_forward
--   backend llama
--       http-request lua.paddler_admit
--       http-request return status 503 ... if { var(txn.paddler_verdict) -m str overflow }
--       http-request return status 503 ... if { var(txn.paddler_verdict) -m str timeout }

local paddler = {}

-- Filled from the environment at load (read_settings); nothing here is a fallback.
local settings = {
  hold_poll_ms = 50,
  affinity_wait_ms = 0,
}
-- How often a request waiting for its conversation's server (affinity_wait_ms) looks at its slots: short
-- against a re-prefill, which is what the wait saves.
local AFFINE_POLL_MS = 5

-- Requests held while no server is usable: held[id] = { deadline = ms, backend = name }. A client that
-- goes away kills its stream without running Lua cleanup, so entries also expire at their deadline.
local held = {}
local next_id = 0

-- Prompt-cache affinity: which server served each conversation, per backend (paddler.remember): two
-- generations of at most AFFINITY_ENTRIES keys each (a key found in the older one moves to the newer), so
-- memory is bounded and recent keys stay.
local AFFINITY_ENTRIES = 65536
local affinity_memory = {}

-- Handover. A reload forks a new worker while the old one finishes its streams and its queue on the
-- same llama-servers; each counts only its own requests against maxconn, so together they can send a
-- server twice its slots. Neither can see the other, so the new worker asks each llama-server how many
-- slots are busy (GET /slots) and takes only the rest: room = slots - (busy - its own requests there).
-- The old worker's share never grows (its checks stop with it, so its maxconn is frozen, it gets no new
-- requests, and a queued request only replaces one of its own that ended), so a count it has shown is
-- an upper bound from then on. A count can still read low for a moment (a request between HAProxy and
-- a slot), so room grows only after `window` samples in a row agree; it shrinks at once. Meanwhile the
-- agent's checks are off for those servers (its maxconn:<slots> would undo the limit); they come back
-- when no other requests are left there. A worker that is itself stopping (a reload during a handover)
-- reacts faster than the newest one, so slots freed by the oldest go to the older waiting requests.
-- HAPROXY_MWORKER_REEXEC is set while a master reloads; lua-load runs there, before the fork.
--
-- Bypass traffic that never stops would keep the agent's checks off for good: a handover ends after
-- max_ms whatever it sees. A handover task that stops answering (an error in HAProxy's Lua) is ended
-- by the next request after stale_ms, so servers never stay at weight 0 without the agent.
local handover = {
  reloaded = os.getenv("HAPROXY_MWORKER_REEXEC") ~= nil,
  gate_until = 0,   -- admit holds requests until then (ms), or until the first /slots answers are in
  gate_max_ms = 5000,
  poll_ms = 50,
  probe_timeout_ms = 1000,
  window = 5,       -- samples in a row before room grows, in the newest worker
  stopping_window = 2,
  max_ms = 600000,
  stale_ms = 3000,
  active = false,
  entries = {},
  heartbeat = 0,
  ends_at = 0,
}

local function now_ms()
  local now = core.now()
  return now.sec * 1000 + now.usec // 1000
end

-- Held requests, of one backend or (backend nil) of all.
function paddler.held_count(now, backend)
  local count = 0
  for id, entry in pairs(held) do
    if entry.deadline <= now then
      held[id] = nil
    elseif backend == nil or entry.backend == backend then
      count = count + 1
    end
  end
  return count
end

-- HAProxy shows an agent-checked server that is up as "no check", a health-checked one as "UP".
function paddler.is_usable(status)
  return status == "UP" or status == "no check" or string.sub(status or "", 1, 3) == "UP "
end

-- Sum slots over the servers HAProxy would send new requests to: usable primaries, or usable
-- standby (backup) servers when no primary is. Each item: {status=, slim=, scur=, bck=}.
function paddler.aggregate(servers)
  local totals = { [false] = { idle = 0, processing = 0, usable = 0 },
                   [true] = { idle = 0, processing = 0, usable = 0 } }
  for _, server in ipairs(servers) do
    if paddler.is_usable(server.status) then
      local group = totals[server.bck == 1]
      local busy = server.scur or 0
      group.processing = group.processing + busy
      group.idle = group.idle + math.max(0, (server.slim or 0) - busy)
      group.usable = group.usable + 1
    end
  end
  if totals[false].usable > 0 then
    return totals[false]
  end
  return totals[true]
end

function paddler.health_body(aggregate, buffered)
  local status = aggregate.usable > 0 and "ok" or "unavailable"
  return string.format('{"status":"%s","slots_idle":%d,"slots_processing":%d,"requests_buffered":%d}',
                       status, aggregate.idle, aggregate.processing, buffered),
         aggregate.usable > 0 and 200 or 503
end

-- The servers of one backend, or (backend nil) of every pool: with model-aware routing a llama-server
-- is in several pools, but usable (and so counted) only in those of the models it serves.
local function server_stats(backend)
  local servers = {}
  for name in pairs(backend and { [backend] = true } or settings.pools) do
    for _, server in pairs(core.backends[name].servers) do
      local stats = server:get_stats()
      servers[#servers + 1] = { status = stats.status, slim = tonumber(stats.slim) or 0,
                                scur = tonumber(stats.scur) or 0, bck = tonumber(stats.bck) or 0,
                                weight = tonumber(stats.weight) or 0, agent_status = stats.agent_status }
    end
  end
  return servers
end

-- Servers that would take a request: up and weighted above 0. Each item: {status=, weight=}.
function paddler.usable_count(servers)
  local count = 0
  for _, server in ipairs(servers) do
    if paddler.is_usable(server.status) and (server.weight or 0) > 0 then
      count = count + 1
    end
  end
  return count
end

-- nbsrv, except in a worker that is stopping after a reload: there nbsrv is 0 (be_usable_srv counts
-- no server of a stopped backend) although its servers still serve the requests it has, so a request
-- held there would wait for nothing until it timed out. Asked only when nbsrv is 0.
local function usable_servers(txn, backend)
  local count = tonumber(txn.f:nbsrv(backend)) or 0
  if count == 0 and tonumber(core.get_info().Stopping) == 1 then
    count = paddler.usable_count(server_stats(backend))
  end
  return count
end

-- With model-aware routing a server may be in a pool of a model it does not serve (its models are
-- discovered), and it starts UP there: a request placed before the agent's first answer for it could get
-- another model's reply. So a pool places nothing until the agent has answered each of its servers once.
function paddler.agent_answered(servers)
  for _, server in ipairs(servers) do
    local status = string.gsub(server.agent_status or "", "^%* ", "") -- "* ": a check under way
    if status == "" or status == "INI" or string.match(status, "^L[46]") or status == "L7TOUT" then
      return false
    end
  end
  return true
end

local answered_pools = {}

local function pool_settled(backend)
  if settings.model_pools == nil or answered_pools[backend] then
    return true
  end
  answered_pools[backend] = paddler.agent_answered(server_stats(backend))
  return answered_pools[backend]
end

local handover_end

function paddler.admit(txn)
  local backend = txn.f:be_name()
  local limits = settings.pools[backend]
  local now = now_ms()
  if handover.active and now - handover.heartbeat > handover.stale_ms then
    handover_end("the handover task stopped answering")
  end
  local buffered = (tonumber(txn.f:queue(backend)) or 0) + paddler.held_count(now, backend)
  if buffered >= limits.max_buffered_requests then
    txn:set_var("txn.paddler_verdict", "overflow")
    return
  end
  if now >= handover.gate_until and pool_settled(backend) and usable_servers(txn, backend) > 0 then
    return -- HAProxy places it now, or queues it until a slot frees
  end
  next_id = next_id + 1
  local id = next_id
  local deadline = now + limits.buffered_request_timeout_ms
  held[id] = { deadline = deadline, backend = backend }
  while now_ms() < handover.gate_until or not pool_settled(backend) or usable_servers(txn, backend) == 0 do
    if now_ms() >= deadline then
      held[id] = nil
      txn:set_var("txn.paddler_verdict", "timeout")
      return
    end
    core.msleep(settings.hold_poll_ms)
  end
  held[id] = nil
end

-- UTF-8 bytes of a code point below 0x10000; like cpp-httplib, nothing for a lone surrogate.
local function utf8_bytes(code)
  if code < 0x80 then
    return string.char(code)
  elseif code < 0x800 then
    return string.char(0xC0 + code // 64, 0x80 + code % 64)
  elseif code >= 0xD800 and code < 0xE000 then
    return ""
  end
  return string.char(0xE0 + code // 4096, 0x80 + (code // 64) % 64, 0x80 + code % 64)
end

-- The path llama-server routes on (cpp-httplib): the target cut at '#', then at '?', then %XX
-- and %uXXXX decoded once, left to right; a '%' not followed by a valid escape stays as it is.
function paddler.llama_server_path(target)
  local path = string.match(string.match(target or "", "^[^#]*"), "^[^?]*")
  if not string.find(path, "%", 1, true) then
    return path
  end
  local out, i, n = {}, 1, #path
  while i <= n do
    local char = string.sub(path, i, i)
    local unicode = char == "%" and string.match(path, "^u(%x%x%x%x)", i + 1)
    local byte = char == "%" and not unicode and string.sub(path, i + 1, i + 1) ~= "u"
                 and string.match(path, "^(%x%x)", i + 1)
    if unicode then
      out[#out + 1] = utf8_bytes(tonumber(unicode, 16))
      i = i + 6
    elseif byte then
      out[#out + 1] = string.char(tonumber(byte, 16))
      i = i + 3
    else
      out[#out + 1] = char
      i = i + 1
    end
  end
  return table.concat(out)
end

-- "METHOD:path" as llama-server will route the request: HEAD is GET there, and any one
-- segment after /slots/ is a slot id.
function paddler.route_key(method, target)
  local path = paddler.llama_server_path(target)
  if string.match(path, "^/slots/[^/]+$") then
    path = "/slots/{id}"
  end
  if method == "HEAD" then
    method = "GET"
  end
  return method .. ":" .. path
end

function paddler.route(txn)
  return paddler.route_key(txn.sf:method(), txn.sf:pathq())
end

-- The pool a request goes to, from its body's model (see request_model): a backend name, or why none:
-- "too_large" (past PADDLER_MAX_REQUEST_BODY), "malformed", "absent" (no model and no default), "unknown".
-- Also returns what request_model read for affinity, when the body was read.
function paddler.pool_for(body, announced)
  if #body > settings.max_request_body or announced > settings.max_request_body then
    return "too_large"
  end
  local verdict, model, fields = paddler.request_model(body)
  if verdict == "absent" then
    return settings.default_pool or "absent", fields
  elseif verdict == "model" then
    return settings.model_pools[model] or "unknown", fields
  end
  return verdict
end

local function digest(txn, key)
  return txn.c:xxh64(key)
end

-- Reads a model route's body: with routing by model, sets txn.paddler_pool (see pool_for); with affinity,
-- keeps the request's affinity keys (hashed) in the transaction for paddler_affine and paddler_remember.
function paddler.read(txn)
  local body, announced = txn.f:req_body() or "", tonumber(txn.f:req_body_size()) or 0
  local fields
  if settings.model_pools ~= nil then
    local pool
    pool, fields = paddler.pool_for(body, announced)
    txn:set_var("txn.paddler_pool", pool)
  elseif #body <= settings.max_request_body and announced <= settings.max_request_body then
    fields = select(3, paddler.request_model(body))
  end
  if not settings.affinity or fields == nil then
    return
  end
  local remember, lookups = paddler.affinity_keys(body, fields, txn.sf:req_hdr("x-session-id"))
  for index, key in ipairs(remember) do
    remember[index] = digest(txn, key)
  end
  for index, key in ipairs(lookups) do
    lookups[index] = digest(txn, key)
  end
  txn:set_priv({ remember = remember, lookups = lookups })
end

-- Backend, after paddler_admit: the server that served this conversation, if it has a slot free now
-- (txn.paddler_affine; haproxy.cfg's use-server rules send the request there). Else, with
-- PADDLER_AFFINITY_WAIT_MS: if every server is full (queue_at_home), that server all the same, and HAProxy
-- queues the request in the server's own queue, which it serves in arrival order with the backend's. If
-- another server has a slot free, the request sleeps here, out of the queue (requests behind it go on), until
-- its server has a slot or the wait is over. Else, or then, nothing: leastconn chooses, or the request waits
-- in the backend's queue for any server.
function paddler.affine(txn)
  local keys, backend = txn:get_priv(), txn.f:be_name()
  local memory = affinity_memory[backend]
  if type(keys) ~= "table" or memory == nil then
    return
  end
  local servers = core.backends[backend].servers
  local home
  for _, key in ipairs(keys.lookups) do
    local name = paddler.recall(memory, key)
    local server = name and servers[name]
    if server ~= nil then
      if paddler.has_free_slot(server:get_stats()) then
        txn:set_var("txn.paddler_affine", name)
        return
      end
      home = home or name
    end
  end
  if home == nil or settings.affinity_wait_ms <= 0 then
    return
  end
  local stats = {}
  for name, server in pairs(servers) do
    stats[name] = server:get_stats()
  end
  if paddler.queue_at_home(home, stats, tonumber(txn.f:queue(backend)) or 0) then
    txn:set_var("txn.paddler_affine", home)
    return
  end
  if not paddler.worth_waiting(home, stats) then
    return
  end
  local deadline = now_ms() + settings.affinity_wait_ms
  repeat
    core.msleep(AFFINE_POLL_MS)
    if paddler.has_free_slot(servers[home]:get_stats()) then
      txn:set_var("txn.paddler_affine", home)
      return
    end
  until now_ms() >= deadline
end

-- A server HAProxy may give requests now: usable, not drained by the agent (weight 0).
local function in_service(stats)
  return stats ~= nil and paddler.is_usable(stats.status) and (tonumber(stats.weight) or 0) > 0
end

-- The servers HAProxy would place ``home``'s requests on: those of its tier (primaries, or standby ones
-- when home is one) in service. stats: server name -> get_stats() row.
local function tier_of(home, stats)
  local tier, bck = {}, tonumber(stats[home].bck) or 0
  for name, server in pairs(stats) do
    if (tonumber(server.bck) or 0) == bck and in_service(server) then
      tier[name] = server
    end
  end
  return tier
end

-- Whether a conversation should wait for its server ``home`` (stats: server name -> {status=, weight=, scur=,
-- slim=, bck=}): it is in service but full, and another of its tier has a slot free now (with none free, the
-- queue is as good; a free standby server takes nothing while primaries serve).
function paddler.worth_waiting(home, stats)
  if not in_service(stats[home]) then
    return false
  end
  for name, server in pairs(tier_of(home, stats)) do
    if name ~= home and paddler.has_free_slot(server) then
      return true
    end
  end
  return false
end

-- Whether a conversation should wait in its server ``home``'s own HAProxy queue (stats as for worth_waiting,
-- with qcur; queued: the backend's queued requests, server queues included): every server of its tier is full,
-- home's queue is shorter than its slots, and enough requests wait that the slots the others free before home
-- frees one (about their slots over home's) go to them rather than stay free.
function paddler.queue_at_home(home, stats, queued)
  if not in_service(stats[home]) then
    return false
  end
  local own_slots, others = tonumber(stats[home].slim) or 0, 0
  for name, server in pairs(tier_of(home, stats)) do
    if paddler.has_free_slot(server) then
      return false
    end
    if name ~= home then
      others = others + (tonumber(server.slim) or 0)
    end
  end
  return own_slots > 0 and (tonumber(stats[home].qcur) or 0) < own_slots and queued * own_slots >= others
end

-- Response: remember which server served the conversation.
function paddler.remember_server(txn)
  local keys = txn:get_priv()
  local server = txn.sf:srv_name()
  if type(keys) ~= "table" or server == nil or server == "" then
    return
  end
  local backend = txn.f:be_name()
  local memory = affinity_memory[backend] or paddler.new_memory()
  affinity_memory[backend] = memory
  for _, key in ipairs(keys.remember) do
    paddler.remember(memory, key, server)
  end
end

local UNKNOWN_MODEL_HEALTH = '{"error":{"code":404,"type":"model_not_found","message":"no such model in this fleet"}}'

-- The pool GET /health?model=NAME asks about: nil for the whole fleet, false for a model the fleet lacks.
function paddler.health_pool(query)
  local model = string.match(query or "", "^model=([^&]*)$")
  if model == nil then
    return nil
  end
  return settings.model_pools ~= nil and settings.model_pools[model] or false
end

-- Requests waiting in a backend (an HAProxy Proxy object): its own queue and its servers' (affinity_wait
-- queues a conversation at its own server), as the queue() sample fetch counts them.
function paddler.queued(backend)
  local queued = tonumber(backend:get_stats().qcur) or 0
  for _, server in pairs(backend.servers) do
    queued = queued + (tonumber(server:get_stats().qcur) or 0)
  end
  return queued
end

function paddler.health(applet)
  local pool = paddler.health_pool(applet.qs)
  local body, status = UNKNOWN_MODEL_HEALTH, 404
  if pool ~= false then
    local queued = 0
    for backend in pairs(pool and { [pool] = true } or settings.pools) do
      queued = queued + paddler.queued(core.backends[backend])
    end
    body, status = paddler.health_body(paddler.aggregate(server_stats(pool)), queued + paddler.held_count(now_ms(), pool))
  end
  applet:set_status(status)
  applet:add_header("content-type", "application/json")
  applet:add_header("content-length", tostring(#body))
  applet:add_header("cache-control", "no-store")
  applet:start_response()
  applet:send(body)
end

-- Model-aware routing. The model a request names, read the way llama-server's JSON parser reads the body
-- (fleet/contract.py's request_model is the reference): a JSON object, no NaN, no trailing text, nested at
-- most MAX_JSON_DEPTH deep; of two top-level "model" members the last, keys compared after unescaping.
-- Returns "model", name | "absent" (none, or null) | "malformed" (anything else). The top level is read in
-- full (at most MAX_TOP_LEVEL_MEMBERS members); the model and the keys that could be "model" are decoded and
-- checked (escapes, UTF-8, control characters); nested arrays and objects are skipped bracket to bracket
-- (their brackets must match and nest at most MAX_JSON_DEPTH deep) and other strings quote to quote, with
-- plain searches: Lua's pattern matching costs ~25 ns a character, a plain search a fraction of that. A body
-- whose only flaw is inside what is skipped is llama-server's to refuse, and it reads no model from it either.
local MAX_JSON_DEPTH = 128
local MAX_TOP_LEVEL_MEMBERS = 256
local MAX_MODEL_KEY_TEXT = 2 + 5 * 6  -- "model" with each letter escaped (\u006d...), and its quotes
local MAX_MODEL_TEXT = 2 + 128 * 12  -- the longest model name, every character escaped, and its quotes
-- Affinity: the top-level strings that name a conversation (decoded like the model, as long), the messages
-- counted per request, and how much of a completion's prompt tells its conversation apart.
local DECODED_FIELDS = { prompt_cache_key = true, user = true }
local MAX_CONVERSATION_MESSAGES = 4096
local PROMPT_LEAD_BYTES = 256
local JSON_ESCAPES = { ['"'] = '"', ["\\"] = "\\", ["/"] = "/", b = "\b", f = "\f", n = "\n", r = "\r", t = "\t" }

local function skip_space(body, i)
  return select(2, string.find(body, "^[ \t\n\r]*", i)) + 1
end

-- UTF-8 that nlohmann::json accepts: utf8.len refuses overlong forms; no code point above U+10FFFF,
-- and no surrogate encoded as UTF-8.
local function valid_utf8(body, first, last)
  local text = string.sub(body, first, last)
  if not string.find(text, "[\128-\255]") then
    return true
  end
  return utf8.len(text) ~= nil and not string.find(text, "[\245-\255]") and not string.find(text, "\244[\144-\191]")
         and not string.find(text, "\237[\160-\191]")
end

-- The string whose opening quote is at i: the index after its closing quote, and its text when decode is
-- true; nil when it is not a valid JSON string.
local function scan_string(body, i, decode)
  local parts, pos = decode and {} or nil, i + 1
  while true do
    local j = string.find(body, '[%z\1-\31"\\]', pos)
    if j == nil then
      return nil
    end
    local byte = string.byte(body, j)
    if byte < 32 then
      return nil
    end
    if decode and j > pos then
      parts[#parts + 1] = string.sub(body, pos, j - 1)
    end
    if byte == 34 then
      if not valid_utf8(body, i + 1, j - 1) then
        return nil
      end
      return j + 1, decode and table.concat(parts) or nil
    end
    local escape = string.sub(body, j + 1, j + 1)
    if escape == "u" then
      local code = tonumber(string.match(body, "^%x%x%x%x", j + 2) or "", 16)
      pos = j + 6
      if code == nil or (code >= 0xDC00 and code < 0xE000) then
        return nil
      elseif code >= 0xD800 and code < 0xDC00 then
        local low = tonumber(string.match(body, "^\\u(%x%x%x%x)", pos) or "", 16)
        if low == nil or low < 0xDC00 or low >= 0xE000 then
          return nil
        end
        code, pos = 0x10000 + (code - 0xD800) * 0x400 + (low - 0xDC00), pos + 6
      end
      if decode then
        parts[#parts + 1] = utf8.char(code)
      end
    elseif JSON_ESCAPES[escape] then
      if decode then
        parts[#parts + 1] = JSON_ESCAPES[escape]
      end
      pos = j + 2
    else
      return nil
    end
  end
end

-- The string whose opening quote is at i, not decoded: the index after its closing quote (the first
-- quote after an even number of backslashes), or nil.
local function skip_string(body, i)
  local pos = i + 1
  while true do
    local quote = string.find(body, '"', pos, true)
    if quote == nil then
      return nil
    end
    local before = quote - 1
    while string.byte(body, before) == 92 do
      before = before - 1
    end
    if (quote - 1 - before) % 2 == 0 then
      return quote + 1
    end
    pos = quote + 1
  end
end

-- The number at i: the index after it, or nil.
local function scan_number(body, i)
  local j = string.sub(body, i, i) == "-" and i + 1 or i
  local whole = string.match(body, "^0", j) or string.match(body, "^[1-9]%d*", j)
  if whole == nil then
    return nil
  end
  j = j + #whole
  local fraction = string.match(body, "^%.%d+", j)
  if fraction then
    j = j + #fraction
  elseif string.sub(body, j, j) == "." then
    return nil
  end
  local exponent = string.match(body, "^[eE][-+]?%d+", j)
  if exponent then
    return j + #exponent
  end
  return not string.match(body, "^[eE]", j) and j or nil
end

local JSON_LITERALS = { t = "true", f = "false", n = "null" }

-- One scalar at i (string, number, literal): the index after it, and its kind and text ("string", text),
-- ("null"), ("other"); nil when invalid.
local function scan_scalar(body, i, decode)
  local char = string.sub(body, i, i)
  if char == '"' then
    if not decode then
      return skip_string(body, i), "string"
    end
    local after, text = scan_string(body, i, true)
    return after, "string", text
  end
  local literal = JSON_LITERALS[char]
  if literal then
    if string.sub(body, i, i + #literal - 1) ~= literal then
      return nil
    end
    return i + #literal, literal == "null" and "null" or "other"
  end
  return scan_number(body, i), "other"
end

local STRUCTURAL = { "[", "]", "{", "}", '"' }

-- The array or object whose opening bracket is at i (at nesting depth `depth`), not read: the index after
-- its closing bracket, or nil when it does not close, closes with the wrong bracket, or nests deeper than
-- MAX_JSON_DEPTH. It jumps from one bracket or quote to the next with plain searches (memchr), each kind's
-- next position kept until passed, so its cost is the number of brackets and strings, not of characters.
local function skip_container(body, i, depth)
  local stack, pos, next_at = { string.sub(body, i, i) }, i + 1, {}
  while true do
    local at, char
    for _, kind in ipairs(STRUCTURAL) do
      local found = next_at[kind]
      if found ~= false and (found == nil or found < pos) then
        found = string.find(body, kind, pos, true) or false
        next_at[kind] = found
      end
      if found and (at == nil or found < at) then
        at, char = found, kind
      end
    end
    if at == nil then
      return nil
    elseif char == '"' then
      pos = skip_string(body, at)
      if pos == nil then
        return nil
      end
    elseif char == "[" or char == "{" then
      if depth + #stack >= MAX_JSON_DEPTH then
        return nil
      end
      stack[#stack + 1], pos = char, at + 1
    elseif stack[#stack] ~= (char == "]" and "[" or "{") then
      return nil
    else
      stack[#stack], pos = nil, at + 1
      if #stack == 0 then
        return pos
      end
    end
  end
end

-- A top-level member's value at i: the index after it, and ("string", text) | ("null") | ("other"); the text
-- only for the model (decode), and not for one longer than any model name: that one reads as "".
local function scan_value(body, i, decode)
  local char = string.sub(body, i, i)
  if char == "{" or char == "[" then
    return skip_container(body, i, 1), "other"
  elseif decode and char == '"' then
    local after = skip_string(body, i)
    if after ~= nil and after - i > MAX_MODEL_TEXT then
      return after, "string", ""
    end
  end
  return scan_scalar(body, i, decode)
end

-- The elements of the array at start: the index after each (at most MAX_CONVERSATION_MESSAGES), skipped
-- as the scanner skips nested values; what affinity keys a conversation by (see paddler.affinity_keys).
local function element_ends(body, start)
  local ends, i = {}, skip_space(body, start + 1)
  while string.sub(body, i, i) ~= "]" and #ends < MAX_CONVERSATION_MESSAGES do
    local char, after = string.sub(body, i, i), nil
    if char == "{" or char == "[" then
      after = skip_container(body, i, 2)
    else
      after = scan_scalar(body, i, false)
    end
    if after == nil then
      return ends
    end
    ends[#ends + 1] = after
    i = skip_space(body, after)
    if string.sub(body, i, i) == "," then
      i = skip_space(body, i + 1)
    end
  end
  return ends
end

-- Returns the verdict and model (see above), and, for prompt-cache affinity, what the body says about its
-- conversation: { prompt_cache_key =, user = } (short strings), and the messages array (messages_start,
-- message_ends) or the prompt string (prompt_start, prompt_end); of repeated keys the last, as for model.
function paddler.request_model(body)
  local i = skip_space(body, 1)
  if string.sub(body, i, i) ~= "{" then
    return "malformed"
  end
  i = skip_space(body, i + 1)
  local verdict, model, members, fields = "absent", nil, 0, {}
  local closing = string.sub(body, i, i) == "}"
  while not closing do
    members = members + 1
    if members > MAX_TOP_LEVEL_MEMBERS or string.sub(body, i, i) ~= '"' then
      return "malformed"
    end
    -- A key longer than "model" written with every letter escaped cannot be "model": not decoded.
    local after, key = skip_string(body, i), nil
    if after ~= nil and after - i <= MAX_MODEL_KEY_TEXT then
      after, key = scan_string(body, i, true)
    end
    if after == nil then
      return "malformed"
    end
    i = skip_space(body, after)
    if string.sub(body, i, i) ~= ":" then
      return "malformed"
    end
    local start, kind, text = skip_space(body, i + 1), nil, nil
    after, kind, text = scan_value(body, start, key == "model" or DECODED_FIELDS[key])
    if after == nil then
      return "malformed"
    end
    if key == "model" then
      if kind == "string" then
        verdict, model = "model", text
      elseif kind == "null" then
        verdict, model = "absent", nil
      else
        verdict, model = "malformed", nil
      end
    elseif DECODED_FIELDS[key] then
      fields[key] = kind == "string" and text ~= "" and text or nil
    elseif key == "messages" then
      fields.messages_start = string.sub(body, start, start) == "[" and start or nil
      fields.message_ends = fields.messages_start and element_ends(body, start)
    elseif key == "prompt" then
      fields.prompt_start, fields.prompt_end = kind == "string" and start or nil, after
    end
    i = skip_space(body, after)
    local char = string.sub(body, i, i)
    closing = char == "}"
    if not closing and char ~= "," then
      return "malformed"
    end
    i = closing and i or skip_space(body, i + 1)
  end
  if skip_space(body, i + 1) <= #body then
    return "malformed"
  end
  return verdict, model, fields
end

-- Prompt-cache affinity: what a request's conversation is known by, in order (docs/affinity.md):
-- OpenAI's prompt_cache_key, the X-Session-Id header, the user field, else the conversation itself.
-- Returns the keys the server that serves it is remembered under, and the keys to look up, best first.
-- A chat is known by its messages: a follow-up turn repeats the previous request's messages and adds the
-- answer and a new question, so it looks up its messages but the last two (the previous turn), then all
-- but the last, then all; it is remembered under all its messages. Never under its first message alone:
-- a system prompt many conversations share is in every server's cache soon, and keying new conversations
-- by it would send them all to one server. A completion is known by its prompt's first PROMPT_LEAD_BYTES
-- bytes.
function paddler.affinity_keys(body, fields, session)
  local named = (fields.prompt_cache_key and "k:" .. fields.prompt_cache_key)
                or (session and session ~= "" and "s:" .. session) or (fields.user and "u:" .. fields.user)
  if named then
    return { named }, { named }
  end
  local ends = fields.message_ends
  if ends and #ends > 0 then
    local start = fields.messages_start
    local function upto(count)
      return "m:" .. string.sub(body, start, ends[count] - 1)
    end
    local lookups = {}
    for _, count in ipairs({ #ends - 2, #ends - 1, #ends }) do
      if count >= 2 or count == #ends then
        lookups[#lookups + 1] = upto(count)
      end
    end
    return { upto(#ends) }, lookups
  end
  if fields.prompt_start then
    local lead = "p:" .. string.sub(body, fields.prompt_start, math.min(fields.prompt_end - 1,
                                                                       fields.prompt_start + PROMPT_LEAD_BYTES - 1))
    return { lead }, { lead }
  end
  return {}, {}
end

function paddler.remember(memory, key, server)
  if memory.current[key] == nil then
    memory.size = memory.size + 1
    if memory.size > AFFINITY_ENTRIES then
      memory.previous, memory.current, memory.size = memory.current, {}, 1
    end
  end
  memory.current[key] = server
end

function paddler.recall(memory, key)
  local server = memory.current[key]
  if server == nil then
    server = memory.previous[key]
    if server ~= nil then
      paddler.remember(memory, key, server)
    end
  end
  return server
end

function paddler.new_memory()
  return { current = {}, previous = {}, size = 0 }
end

-- The load guard: an affine server takes the request only with a slot free now (HAProxy's own count), so a
-- request never waits for it, nor makes llama.cpp queue. Each item: {status=, weight=, scur=, slim=}.
function paddler.has_free_slot(stats)
  return in_service(stats) and (tonumber(stats.scur) or 0) < (tonumber(stats.slim) or 0)
end

-- llama-server's GET /slots: a JSON list with one "is_processing" per slot. Returns slots, busy
-- (nil when the body has no slot at all: not a llama-server, or an error page).
function paddler.count_slots(body)
  local total, busy = 0, 0
  for value in string.gmatch(body or "", '"is_processing"%s*:%s*(%a+)') do
    total = total + 1
    if value == "true" then
      busy = busy + 1
    end
  end
  if total == 0 then
    return nil
  end
  return total, busy
end

-- "http://host:port/slots" from Server:get_addr() ("1.2.3.4:80", or "::1:80" for IPv6). None for an empty
-- spare server (0.0.0.0:0, port 0): probing it would only wait out the timeout while requests are gated.
function paddler.slots_url(addr)
  local host, port = string.match(addr or "", "^(.*):(%d+)$")
  if host == nil or host == "" or tonumber(port) == 0 then
    return nil
  end
  if string.find(host, ":", 1, true) then
    host = "[" .. host .. "]"
  end
  return "http://" .. host .. ":" .. port .. "/slots"
end

-- Requests on a server that are not this worker's: busy slots less its own. `own` is the smaller of
-- its count before and after the /slots answer, so a request of its own that started or ended
-- meanwhile is never taken for someone else's room.
function paddler.others(busy, own_before, own_after)
  return math.max(0, busy - math.min(own_before, own_after))
end

-- Keeps the last `window` samples (newest last) and returns the room they leave: slots less the
-- highest of them. So room shrinks with one high sample and grows only when `window` agree.
function paddler.handover_room(samples, sample, window, slots)
  samples[#samples + 1] = sample
  while #samples > window do
    table.remove(samples, 1)
  end
  local highest = 0
  for _, value in ipairs(samples) do
    highest = math.max(highest, value)
  end
  return math.max(0, slots - highest), highest
end

local function probe_slots(server)
  local url = paddler.slots_url(server:get_addr())
  if url == nil then
    return nil
  end
  local response = core.httpclient():get({ url = url, timeout = handover.probe_timeout_ms })
  if response == nil or response.status ~= 200 then
    return nil
  end
  return paddler.count_slots(response.body)
end

local function own_requests(server)
  return tonumber(server:get_stats().scur) or 0
end

-- maxconn 0 would mean unlimited, so a server with no room is weighted 0 instead (not used while the
-- others are; paddler_admit holds requests when none is). Setting maxconn again after the weight
-- hands it queued requests through HAProxy's counted path.
local function apply_room(entry, room)
  if room == entry.room then
    return
  end
  core.log(core.notice, string.format("paddler handover (pid %s): %s room %d of %d slots", core.get_info().Pid,
                                      entry.name, room, entry.slots))
  if room == 0 then
    entry.server:set_weight("0")
  else
    entry.server:set_maxconn(tostring(room))
    if entry.room == nil or entry.room == 0 then
      entry.server:set_weight(tostring(entry.weight))
      entry.server:set_maxconn(tostring(room))
    end
  end
  entry.room = room
end

local function sample(entry, window)
  local before = own_requests(entry.server)
  local slots, busy = probe_slots(entry.server)
  if slots == nil or not handover.active then
    return nil -- no answer: keep the last limit (or the handover ended while this one waited)
  end
  entry.slots = slots
  local room, highest = paddler.handover_room(entry.samples, paddler.others(busy, before, own_requests(entry.server)),
                                              window, slots)
  apply_room(entry, room)
  return highest
end

-- Back to the agent: its next reply sets its own limit again; until then, the slots llama-server reports.
handover_end = function(reason)
  handover.active = false
  for _, entry in pairs(handover.entries) do
    entry.server:set_maxconn(tostring(entry.slots))
    entry.server:set_weight(tostring(entry.weight))
    entry.server:agent_enable()
  end
  core.log(core.notice, string.format("paddler handover (pid %s): %s, the agent's checks are back",
                                      core.get_info().Pid, reason))
end

-- Done when no server has anyone else's requests: each answered 0 `window` times in a row, or does not
-- answer and HAProxy has it down (a dead server must not keep the agent off the live ones).
local function nothing_left(entries, highest)
  for name, entry in pairs(entries) do
    if highest[name] ~= 0 and (highest[name] ~= nil or paddler.is_usable(entry.server:get_stats().status)) then
      return false
    end
  end
  return true
end

local function handover_task()
  local entries, someone_else = {}, false
  for name, server in pairs(core.backends[settings.backend].servers) do -- one pool: no handover with models
    local before = own_requests(server)
    local slots, busy = probe_slots(server)
    if slots ~= nil then
      entries[name] = { name = name, server = server, samples = {}, slots = slots, weight = server:get_weight() }
      someone_else = someone_else or paddler.others(busy, before, own_requests(server)) > 0
    end
  end
  if not someone_else then
    handover.gate_until = 0
    return -- nothing runs on these servers: nothing to hand over
  end
  handover.entries, handover.active = entries, true
  handover.heartbeat = now_ms()
  handover.ends_at = handover.heartbeat + handover.max_ms
  -- One answer may read low (see above): every slot counts as taken until `window` answers agree.
  for _, entry in pairs(entries) do
    entry.server:agent_disable()
    apply_room(entry, paddler.handover_room(entry.samples, entry.slots, handover.window, entry.slots))
  end
  handover.gate_until = 0
  while handover.active do
    core.msleep(handover.poll_ms)
    local window = tonumber(core.get_info().Stopping) == 1 and handover.stopping_window or handover.window
    local highest = {}
    for name, entry in pairs(entries) do
      handover.heartbeat = now_ms()
      highest[name] = handover.active and sample(entry, window)
    end
    if not handover.active then
      return -- ended by admit's watchdog meanwhile
    elseif nothing_left(entries, highest) then
      handover_end("done")
    elseif now_ms() >= handover.ends_at then
      handover_end("still busy after " .. handover.max_ms // 1000 .. " s, given up")
    end
  end
end

-- Each setting is required: a config that lacks one must fail at load, not run on a guess.
function paddler.required_env(getenv, name, kind)
  local value = getenv(name)
  if value == nil or value == "" then
    error("paddler.lua: " .. name .. " is not set (setenv " .. name .. " in haproxy.cfg's global section)")
  end
  if kind == "number" then
    local number = tonumber(value)
    if number == nil or number < 1 or number ~= math.floor(number) then
      error("paddler.lua: " .. name .. " must be a whole number of at least 1, got " .. value)
    end
    return number
  end
  return value
end

-- PADDLER_MODELS: "<model>,<max_buffered_requests>,<buffered_request_timeout_ms>" per model, "/" between.
-- Returns pools (backend name -> limits) and model_pools (model -> backend name); errors name the word.
function paddler.parse_models(text, prefix)
  local pools, model_pools = {}, {}
  for word in string.gmatch(text, "[^/]+") do
    local model, limit, timeout = string.match(word, "^([^,]+),(%d+),(%d+)$")
    if model == nil or tonumber(limit) < 1 or tonumber(timeout) < 1 then
      error("paddler.lua: PADDLER_MODELS: " .. word .. " is not <model>,<max_buffered_requests>,<timeout_ms>")
    end
    local backend = prefix .. "." .. model
    pools[backend] = { max_buffered_requests = tonumber(limit), buffered_request_timeout_ms = tonumber(timeout) }
    model_pools[model] = backend
  end
  if next(model_pools) == nil then
    error("paddler.lua: PADDLER_MODELS names no model")
  end
  return pools, model_pools
end

-- What pool_for decides by: model -> backend, the backend of requests naming none (nil: they get "absent"),
-- and the largest body read.
function paddler.configure_models(model_pools, default_pool, max_request_body)
  settings.model_pools, settings.default_pool, settings.max_request_body = model_pools, default_pool, max_request_body
end

local function read_settings()
  settings.backend = paddler.required_env(os.getenv, "PADDLER_BACKEND", "string")
  settings.pools = { [settings.backend] = {
    max_buffered_requests = paddler.required_env(os.getenv, "PADDLER_MAX_BUFFERED_REQUESTS", "number"),
    buffered_request_timeout_ms = paddler.required_env(os.getenv, "PADDLER_BUFFERED_REQUEST_TIMEOUT_MS", "number"),
  } }
  settings.affinity = os.getenv("PADDLER_AFFINITY") == "on"
  if settings.affinity then
    settings.max_request_body = paddler.required_env(os.getenv, "PADDLER_MAX_REQUEST_BODY", "number")
    if os.getenv("PADDLER_AFFINITY_WAIT_MS") ~= nil then
      settings.affinity_wait_ms = paddler.required_env(os.getenv, "PADDLER_AFFINITY_WAIT_MS", "number")
    end
  end
  local models = os.getenv("PADDLER_MODELS")
  if models ~= nil then
    local pools, model_pools = paddler.parse_models(models, settings.backend)
    local default = os.getenv("PADDLER_DEFAULT_MODEL")
    if default ~= nil and model_pools[default] == nil then
      error("paddler.lua: PADDLER_DEFAULT_MODEL is not in PADDLER_MODELS: " .. default)
    end
    settings.pools = pools
    paddler.configure_models(model_pools, default and model_pools[default],
                             paddler.required_env(os.getenv, "PADDLER_MAX_REQUEST_BODY", "number"))
  end
  for backend in pairs(settings.pools) do
    if core.backends[backend] == nil then
      error("paddler.lua: no backend " .. backend .. " (PADDLER_BACKEND, PADDLER_MODELS)")
    end
  end
end

if core ~= nil and core.register_action ~= nil then
  core.register_init(read_settings)
  core.register_action("paddler_admit", { "http-req" }, paddler.admit, 0)
  core.register_service("paddler_health", "http", paddler.health)
  core.register_fetches("paddler_route", paddler.route)
  core.register_action("paddler_read", { "http-req" }, paddler.read, 0)
  core.register_action("paddler_affine", { "http-req" }, paddler.affine, 0)
  core.register_action("paddler_remember", { "http-res" }, paddler.remember_server, 0)
  if handover.reloaded and os.getenv("PADDLER_MODELS") == nil then
    handover.gate_until = now_ms() + handover.gate_max_ms
    core.register_task(handover_task)
  end
end

return paddler
