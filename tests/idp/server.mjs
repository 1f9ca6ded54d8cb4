// A real OpenID provider (panva/oidc-provider) for the test suite, issuing tokens shaped like
// Keycloak's for the realm "shanoir-ng". Loopback only; every token and grant lives in memory.
//
//   node tests/idp/server.mjs --port P --jwks FILE [--opaque] [--ttl S] [--typ T]
//   (or IDP_PORT, IDP_JWKS, IDP_OPAQUE=1, IDP_TTL, IDP_TYP)
//
// FILE is a private JWKS: the first key signs, every key's public part is published.
// Prints "ready" on stdout once listening; exits with 0 on SIGTERM or SIGINT.
import { timingSafeEqual } from 'node:crypto';
import { readFileSync } from 'node:fs';
import http from 'node:http';
import { parseArgs } from 'node:util';

import Provider, { errors } from 'oidc-provider';

const { values: args } = parseArgs({
  options: {
    port: { type: 'string' },
    jwks: { type: 'string' },
    ttl: { type: 'string' },
    typ: { type: 'string' },
    opaque: { type: 'boolean' },
  },
});
const env = process.env;
const PORT = Number(args.port ?? env.IDP_PORT);
const JWKS_FILE = args.jwks ?? env.IDP_JWKS;
const TTL = Number(args.ttl ?? env.IDP_TTL ?? 300);
const TYP = args.typ ?? env.IDP_TYP; // header "typ" of JWT access tokens; default at+jwt
const OPAQUE = args.opaque ?? ['1', 'true', 'yes'].includes(env.IDP_OPAQUE ?? '');
if (!Number.isInteger(PORT) || PORT <= 0 || !JWKS_FILE || !Number.isInteger(TTL) || TTL <= 0) {
  console.error('usage: server.mjs --port P --jwks FILE [--opaque] [--ttl S] [--typ T]');
  process.exit(2);
}

const REALM = '/realms/shanoir-ng';
const ISSUER = `http://127.0.0.1:${PORT}${REALM}`;
const AUDIENCE = 'dicomweb-proxy';
// Resource indicators must be absolute URIs; the audience put in tokens is the plain client id.
const RESOURCE = 'urn:shanoir:dicomweb-proxy';
const USER_SCOPE = 'openid profile email'; // Keycloak's default client scopes
const SERVICE_SCOPE = 'profile email';

// Users (password grant). Keycloak's "sub" is a UUID; Shanoir's own id is the userId claim.
const USERS = new Map(
  [
    ['alice', 'alice-pw', 1, ['ROLE_USER'], ['viewer'], 'Alice', 'Liddell'],
    ['bob', 'bob-pw', 2, ['ROLE_USER'], ['viewer'], 'Bob', 'Morane'],
    ['admin', 'admin-pw', 3, ['ROLE_ADMIN', 'ROLE_USER'], ['viewer', 'uploader'], 'Ada', 'Admin'],
  ].map(([username, password, userId, roles, clientRoles, givenName, familyName]) => [username, {
    username, password, userId, roles, clientRoles, givenName, familyName,
    sub: `00000000-0000-4000-8000-${String(userId).padStart(12, '0')}`,
  }]),
);
const SERVICE_ACCOUNT_SUB = '00000000-0000-4000-8000-000000000100';
const ACCOUNTS = new Map([...USERS.values()].map((user) => [user.sub, user]));

// Keycloak's shape: the audience of a user token also names "account" (its account console),
// and resource_access holds client roles per client.
function keycloakClaims(token) {
  const user = token.accountId && ACCOUNTS.get(token.accountId);
  const common = { typ: 'Bearer', azp: token.clientId };
  if (!user) {
    // client_credentials: Keycloak's service-account user, without a Shanoir userId.
    return {
      ...common,
      sub: SERVICE_ACCOUNT_SUB,
      aud: AUDIENCE,
      scope: token.scope || SERVICE_SCOPE,
      preferred_username: `service-account-${token.clientId}`,
      realm_access: { roles: ['default-roles-shanoir-ng'] },
      resource_access: { [AUDIENCE]: { roles: ['introspection'] } },
    };
  }
  return {
    ...common,
    sub: user.sub,
    aud: [AUDIENCE, 'account'],
    scope: token.scope || USER_SCOPE,
    userId: user.userId,
    preferred_username: user.username,
    email: `${user.username}@shanoir.example.org`,
    email_verified: true,
    name: `${user.givenName} ${user.familyName}`,
    given_name: user.givenName,
    family_name: user.familyName,
    realm_access: { roles: user.roles },
    resource_access: {
      [AUDIENCE]: { roles: user.clientRoles },
      account: { roles: ['manage-account', 'view-profile'] },
    },
  };
}

// oidc-provider writes its own aud (a single string), sub and scope *after* the claims of
// extraTokenClaims, in JWTs and in introspection answers alike: these put Keycloak's back.
const restore = (target, extra) => {
  for (const claim of ['aud', 'sub', 'scope']) target[claim] = extra[claim];
};

const resourceServer = {
  audience: AUDIENCE,
  scope: `${USER_SCOPE} roles`,
  accessTokenFormat: OPAQUE ? 'opaque' : 'jwt',
  accessTokenTTL: TTL,
  jwt: { sign: { alg: 'RS256' } }, // the first RS256 key of the keystore
};

const provider = new Provider(ISSUER, {
  jwks: JSON.parse(readFileSync(JWKS_FILE, 'utf8')),
  clients: [
    {
      client_id: 'dicomweb-proxy', // the gateway: service account + introspection
      client_secret: 'proxy-secret',
      grant_types: ['client_credentials'],
      response_types: [],
      redirect_uris: [],
      token_endpoint_auth_method: 'client_secret_basic',
    },
    // Viewers: public clients (no secret), Resource Owner Password Credentials only.
    ...['shanoir-ng-front', 'ohif'].map((clientId) => ({
      client_id: clientId,
      grant_types: ['password'],
      response_types: [],
      redirect_uris: [],
      token_endpoint_auth_method: 'none',
    })),
  ],
  // Keycloak's endpoint paths, under the issuer's path.
  routes: {
    authorization: '/protocol/openid-connect/auth',
    end_session: '/protocol/openid-connect/logout',
    introspection: '/protocol/openid-connect/token/introspect',
    jwks: '/protocol/openid-connect/certs',
    pushed_authorization_request: '/protocol/openid-connect/ext/par/request',
    revocation: '/protocol/openid-connect/revoke',
    token: '/protocol/openid-connect/token',
    userinfo: '/protocol/openid-connect/userinfo',
  },
  scopes: ['openid', 'offline_access', 'profile', 'email', 'roles'],
  ttl: { AccessToken: TTL, ClientCredentials: TTL },
  clientBasedCORS: () => true,
  extraTokenClaims: async (ctx, token) => keycloakClaims(token),
  formats: {
    customizers: {
      jwt(ctx, token, jwt) {
        restore(jwt.payload, token.extra);
        if (TYP) jwt.header = { typ: TYP }; // e.g. "JWT", as Keycloak writes
      },
    },
  },
  features: {
    clientCredentials: { enabled: true },
    devInteractions: { enabled: false },
    introspection: {
      enabled: true,
      // Only the gateway may introspect (public clients would otherwise see their own tokens).
      allowedPolicy: async (ctx, client) => client.clientId === 'dicomweb-proxy',
    },
    revocation: { enabled: true },
    resourceIndicators: {
      enabled: true,
      // Every token is for the gateway, whether or not the client sends resource=.
      defaultResource: async () => RESOURCE,
      getResourceServerInfo: async (ctx, resource) => {
        if (resource !== RESOURCE) throw new errors.InvalidTarget();
        return resourceServer;
      },
    },
  },
});

const sameSecret = (a, b) => {
  const [x, y] = [Buffer.from(a), Buffer.from(b)];
  return x.length === y.length && timingSafeEqual(x, y);
};

// RFC 6749 §4.3, which oidc-provider does not ship. The token endpoint has already
// authenticated the client and checked that "password" is among its grant_types.
provider.registerGrantType('password', async (ctx) => {
  const { client, params } = ctx.oidc;
  if (!params.username || !params.password) {
    throw new errors.InvalidRequest('missing username or password');
  }
  if (params.resource !== undefined && params.resource !== RESOURCE) {
    throw new errors.InvalidTarget();
  }
  const user = USERS.get(params.username);
  if (!user || !sameSecret(user.password, params.password)) {
    // Keycloak's wording (oidc-provider's InvalidGrant would say "grant request is invalid").
    throw new errors.CustomOIDCProviderError('invalid_grant', 'Invalid user credentials');
  }
  const granted = new Set(resourceServer.scope.split(' '));
  const requested = params.scope ? params.scope.split(' ') : USER_SCOPE.split(' ');
  const token = new provider.AccessToken({
    accountId: user.sub,
    client,
    gty: 'password',
    scope: requested.filter((scope) => granted.has(scope)).join(' ') || undefined,
  });
  // Setting the resource server sets aud and selects the format (jwt or opaque) and TTL.
  token.resourceServer = new provider.ResourceServer(RESOURCE, resourceServer);
  ctx.oidc.entity('AccessToken', token);
  const value = await token.save();
  ctx.body = {
    access_token: value,
    expires_in: token.expiration,
    token_type: token.tokenType,
    scope: token.extra.scope,
    'not-before-policy': 0,
  };
}, ['username', 'password', 'scope', 'resource']);

// The introspection answer: same restoring as for JWTs (RFC 7662 for opaque tokens only;
// oidc-provider refuses to introspect its own JWTs).
provider.use(async (ctx, next) => {
  await next();
  if (ctx.oidc?.route === 'introspection' && ctx.body?.active) {
    const { AccessToken, ClientCredentials } = ctx.oidc.entities;
    restore(ctx.body, (AccessToken ?? ClientCredentials).extra);
  }
});
provider.on('server_error', (ctx, error) => console.error('server_error', error));

// Mount under the issuer's path, as Keycloak does. oidc-provider routes on req.url and
// derives the mount path for the URLs it writes from req.originalUrl.
const callback = provider.callback();
const server = http.createServer((req, res) => {
  if (req.url === REALM || req.url.startsWith(`${REALM}/`)) {
    req.originalUrl = req.url;
    req.url = req.url.slice(REALM.length) || '/';
    callback(req, res);
  } else {
    res.writeHead(404, { 'content-type': 'application/json' });
    res.end('{"error":"Unable to find matching target resource method"}');
  }
});

const shutdown = () => {
  server.close(() => process.exit(0));
  server.closeAllConnections();
};
process.on('SIGTERM', shutdown);
process.on('SIGINT', shutdown);

server.listen(PORT, '127.0.0.1', () => console.log('ready'));
