#!/usr/bin/env sh
# Start the machine's RabbitMQ node (detached) with room for many connections: every AMQP
# connection (a till, a service) takes a file descriptor, and the usual limit of 1024
# leaves about 830 sockets. Debian's rabbitmq-server wrapper switches to the rabbitmq
# user with su, whose PAM session sets the limit back to 1024, so as root the node is
# started as that user directly, raising the limit in its own shell.
raise='ulimit -n 65536 2>/dev/null || ulimit -n "$(ulimit -Hn)" 2>/dev/null || true'
if [ "$(id -u)" = 0 ] && id rabbitmq >/dev/null 2>&1 && [ -x /usr/lib/rabbitmq/bin/rabbitmq-server ]; then
  cd /var/lib/rabbitmq || exit 1
  exec su rabbitmq -s /bin/sh -c "$raise; exec /usr/lib/rabbitmq/bin/rabbitmq-server -detached"
fi
eval "$raise"
exec rabbitmq-server -detached
