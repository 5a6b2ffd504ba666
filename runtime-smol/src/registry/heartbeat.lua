redis.call('SET', KEYS[1], ARGV[2], 'PX', ARGV[3])
redis.call('SADD', KEYS[2], ARGV[1])
local alive = {}
for _, name in ipairs(redis.call('SMEMBERS', KEYS[2])) do
    local mesh = redis.call('GET', ARGV[4] .. name)
    if mesh then
        table.insert(alive, name)
        table.insert(alive, mesh)
    else
        redis.call('SREM', KEYS[2], name)
    end
end
return alive
