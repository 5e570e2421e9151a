// The ACL recipes of docs/operating.md, applied as written on every node: ioredis and
// node-redis (one server and a cluster) connect as the application user, decide,
// settle and spend credits, and get NOPERM for every administrator command.

import { test } from "node:test";
import assert from "node:assert/strict";
import Redis from "ioredis";
import { createClient, createCluster } from "redis";
import {
  CLUSTER, STANDALONE, applyAclRecipe, asMap, runSnippets, serverHasModuleAclCategories, setPlans,
} from "./helpers.mjs";

await setPlans();
const { tollgate: ioTollgate, cluster: snippetCluster } = await runSnippets(
  ["js-ioredis-cluster"], ["tollgate", "cluster"]);
snippetCluster.disconnect();

const RECIPES = ["acl-names", ...(serverHasModuleAclCategories() ? ["acl-categories"] : [])];
let runs = 0;

function appCalls() {
  const n = runs++;
  const [user, credits] = [`{acct:js${n}}:user`, `{acct:js${n}}:credits`];
  return [
    ["RL.ACQUIRE", user, "clients", "ID", "a1", "CREDITS", credits, "0"],
    ["RL.PEEK", user, "clients"],
    ["RL.USAGE", user, "clients"],
    ["RL.TOUCH", user, "a1", "10000"],
    ["RL.RELEASE", user, "a1"],
    ["RL.THROTTLE", `user:js${n}`, "5", "10", "60"],
    ["RL.CREDITS.DEDUCT", credits, "1", "PARTIAL", "ID", "d1"],
    ["RL.CREDITS.REFUND", credits, "d1"],
    ["RL.CREDITS.BALANCE", credits],
    ["RL.CREDITS.BLOCKS", credits],
  ];
}

const ADMIN_CALLS = [
  ["RL.PLAN.SET", "clients", "rpm", "fixed 1/1m"],
  ["RL.PLAN.DEL", "clients"],
  ["RL.PLAN.DEFAULT", "clients"],
  ["RL.CREDITS.GRANT", "{acct:1}:credits", "1000000"],
  ["RL.CREDITS.REVOKE", "{acct:1}:credits", "b1"],
  ["RL.ASSIGN", "{acct:1}:user", "clients"],
  ["RL.UNASSIGN", "{acct:1}:user"],
  ["RL.APPLY", "{acct:1}:user", "x"],
  ["DEL", "{acct:1}:user"],
];

async function checkConfined(call) {
  for (const args of appCalls()) await call(...args);
  assert.equal(asMap(await call("RL.ACQUIRE", "user:js", "clients")).allowed, 1);
  for (const args of ADMIN_CALLS) {
    await assert.rejects(call(...args), /NOPERM/, args.join(" "));
  }
}

for (const recipe of RECIPES) {
  test(`${recipe}: ioredis (one server and a cluster) connects, decides, is refused admin commands`, async () => {
    applyAclRecipe(recipe, [STANDALONE, ...CLUSTER]);
    const auth = { username: "app", password: "app-secret", enableReadyCheck: false };
    const redis = new Redis({ port: STANDALONE, ...auth });
    const cluster = new Redis.Cluster([{ host: "127.0.0.1", port: CLUSTER[0] }],
      { redisOptions: auth });
    try {
      assert.equal(await redis.ping(), "PONG");
      await checkConfined((...a) => redis.call(...a));
      await checkConfined((...a) => ioTollgate(cluster, ...a));
    } finally {
      redis.disconnect();
      cluster.disconnect();
    }
  });

  test(`${recipe}: node-redis (one server and a cluster) connects, decides, is refused admin commands`, async () => {
    applyAclRecipe(recipe, [STANDALONE, ...CLUSTER]);
    const client = await createClient({ url: `redis://app:app-secret@127.0.0.1:${STANDALONE}` })
      .connect();
    const cluster = await createCluster({
      rootNodes: [{ url: `redis://127.0.0.1:${CLUSTER[0]}` }],
      defaults: { username: "app", password: "app-secret" },
    }).connect();
    try {
      assert.equal(await client.ping(), "PONG");
      await checkConfined((...a) => client.sendCommand(a));
      await checkConfined((...a) => cluster.sendCommand(a[1], false, a));
    } finally {
      await client.close();
      await cluster.close();
    }
  });
}
